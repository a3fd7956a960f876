"""One configuration timed in a process of its own (timing.py starts this as `python -m
promptmux.runtime.timing_worker`).

JSON lines on stdin and stdout: first {"deploy", "kwargs" (Runtime's, plus "force": the engine a routed runtime keeps
to), "shapes"}, answered {"ok": real tokens per row per shape} once the runtime is open and each shape has run on
the model OpenVINO compiles for it (openvino_session.SPECIALIZE_AFTER); then {"time": true}: after
SETTLE_S idle, each shape in turn gets one untimed call and BLOCK timed ones, answered {"ok": [[median seconds,
positions of the batch] per shape, the full-sequence batches each graph file has run so far (Runtime.graph_runs)]}.
Errors are answered {"error": [type, message, traceback]}. Anything else written to stdout goes to stderr, so the
answers' line stays clean.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext


def _answer(out, **message) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _error(out, e: BaseException) -> None:
    _answer(out, error=[type(e).__name__, str(e), traceback.format_exc()])


def main() -> None:
    out = os.fdopen(os.dup(1), "w")  # the answers' own copy of stdout
    os.dup2(2, 1)  # what anything else writes to stdout, Python or a C library, goes to stderr
    sys.stdout = sys.stderr
    try:
        # imported only now, so that nothing they print at import reaches the answers
        from promptmux.runtime import accuracy_control
        from promptmux.runtime.runtime import Runtime
        from promptmux.runtime.timing import BLOCK, SETTLE_S, workload

        setup = json.loads(sys.stdin.readline())
        kwargs = dict(setup["kwargs"])
        force = kwargs.pop("force", None)
        with accuracy_control.deferred() if kwargs.pop("defer_accuracy_control", False) else nullcontext():
            rt = Runtime(setup["deploy"], **kwargs)  # a deferred candidate: its recorded miss, not a search
        rt.routing.force = force  # a routed runtime kept on one engine (routing.py)
        runs = [workload(rt, tuple(shape)) for shape in setup["shapes"]]
    except Exception as e:  # noqa: BLE001 - the parent raises it with this message
        _error(out, e)
        return
    try:  # each shape into the model OpenVINO compiles for it (openvino_session.py): the rounds time the steady state
        from promptmux.runtime import openvino_session

        for (run, _tokens), shape in zip(runs, setup["shapes"]):
            if len(shape) < 3 or not shape[2]:  # full-sequence batches (a generation's decoder steps never specialise)
                for _ in range(openvino_session.SPECIALIZE_AFTER):
                    run()
        openvino_session.wait_for_specialisation()
        rt.graph_runs.clear()  # these warm-up batches are not timed
    except Exception as e:  # noqa: BLE001 - the parent raises it with this message
        _error(out, e)
        return
    _answer(out, ok=[tokens for _, tokens in runs])
    for _ in sys.stdin:  # a round; until the parent closes our input
        try:
            time.sleep(SETTLE_S)  # the previous process's threads stop spinning (ONNX Runtime's spin on after a call)
            shapes = []
            for run, _tokens in runs:
                run()  # untimed: it warms this shape again
                block = []
                for _ in range(BLOCK):
                    t = time.perf_counter()
                    run()
                    block.append(time.perf_counter() - t)
                shapes.append([statistics.median(block), rt.routing.last_positions])
            _answer(out, ok=[shapes, dict(rt.graph_runs)])
        except Exception as e:  # noqa: BLE001
            _error(out, e)


if __name__ == "__main__":
    main()
