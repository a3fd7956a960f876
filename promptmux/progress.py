"""A progress bar for promptmux's long steps (export stages, ORT optimization, prompt precompute, ...).

A step can run for a minute on a real model without an update; the bar is redrawn every second meanwhile, so the
elapsed time keeps moving and the current step's name stays on screen.
"""

from __future__ import annotations

import threading

REDRAW_S = 1.0
# Set by the command line's Ctrl-C handler (promptmux/cli). Python delivers Ctrl-C as a KeyboardInterrupt wherever
# the main thread is, and one that lands in a callback (an import lock's, a weakref's) is printed as "Exception
# ignored" and lost: the long work then went on and finished. Each step boundary raises it again.
interrupted = threading.Event()


def raise_if_interrupted() -> None:
    if interrupted.is_set():
        raise KeyboardInterrupt


class StepBar:
    def __init__(self, total: int, desc: str, quiet: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="step", disable=quiet, leave=False)
        self._stop = threading.Event()
        if not quiet:
            threading.Thread(target=self._redraw, daemon=True).start()

    def _redraw(self) -> None:
        while not self._stop.wait(REDRAW_S):
            self._bar.refresh()

    def step(self, name: str) -> None:
        """The step now running (shown after the bar)."""
        raise_if_interrupted()
        self._bar.set_postfix_str(name)

    def update(self, n: int = 1) -> None:
        raise_if_interrupted()
        self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
