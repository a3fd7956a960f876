"""Backend "onnxruntime+openvino": both exact CPU engines behind one session, each batch on the one that is faster
for its size (fp32 classifiers; what `auto` picks for them where OpenVINO is installed).

A batch goes by its positions (rows x width, virtual tokens included); where the engines cross over is measured on
each CPU kind for each deployment (routing.py). Both compute fp32 and pass the same fidelity tests against PEFT.
Each engine is made on its first batch, so a process that only sees small batches never compiles OpenVINO. The
measurements behind the design: studies/cpu_hybrid.py, results/cpu-hybrid*.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from .routing import Routing
from .sessions import OnFirstUse


class RoutedSession:
    """run()/run_all() on ONNX Runtime or OpenVINO by batch size; `runs` counts the batches each engine ran."""

    def __init__(self, make_small, make_large, routing: Routing | None = None):
        self.engines = {"onnxruntime": OnFirstUse(make_small), "openvino": OnFirstUse(make_large)}
        self.routing = routing or Routing()  # the split, shared by a runtime's routed sessions (routing.py)
        self.routing.sessions.add(self)
        self.runs: Counter = Counter()
        self._last = threading.local()  # the engine of each thread's last batch

    def engine_for(self, feeds: dict[str, np.ndarray]) -> str:
        return self.routing.engine_for(*feeds["attention_mask"].shape[:2])

    def run(self, feeds: dict[str, np.ndarray], bank_key=None) -> np.ndarray:
        name = self._last.engine = self.engine_for(feeds)
        self.runs[name] += 1
        return self.engines[name].run(feeds, bank_key)

    def run_all(self, feeds: dict[str, np.ndarray], bank_key=None) -> list[np.ndarray]:
        name = self._last.engine = self.engine_for(feeds)
        self.runs[name] += 1
        return self.engines[name].run_all(feeds, bank_key)

    @property
    def ran_static(self) -> bool:
        """Whether this thread's last batch ran an OpenVINO model compiled for its shape (openvino_session.py)."""
        return getattr(self._last, "engine", None) == "openvino" and self.engines["openvino"].ran_static

    @property
    def input_names(self) -> list[str]:
        return self.engines["onnxruntime"].input_names
