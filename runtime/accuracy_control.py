"""Accuracy control for int8 classifiers: when the dynamic int8 graphs miss their accuracy contract, keep in fp32
the few weight MatMuls whose quantization moves the missed tasks' outputs most, fewest first, until the contract
holds. This is the search NNCF's quantize_with_accuracy_control makes for OpenVINO, over ONNX Runtime's dynamic
quantization (quantize.py), which is what int8 classifiers run here.

1. Rank: each weight MatMul quantized alone (the others fp32), run on the calibration rows of the tasks that
   missed (up to RANK_TASKS of them); its score is the mean absolute change of their class probabilities against fp32.
2. Keep the top 1, 2, 4, ... layers in fp32 (the deployment's int8 graphs made again with them), measuring the
   whole contract after each, up to MAX_FP32_SHARE of the layers (each one kept costs speed).
3. The first set that passes is recorded in the contract ("fp32_layers") and the graphs stay made with it; if none
   passes, the graphs go back to all int8 and the contract records the miss and what was tried.

Small low-margin tasks (answers near 50/50 that flip under any rounding) are what this is for: the demo's sentiment
task kept 96.0 % of fp32's predictions with every layer int8, under the labelled rule's 97 %.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")

MAX_FP32_SHARE = 0.25  # at most this share of the weight MatMuls is kept fp32
# The missed tasks whose rows rank the layers: every layer's graph runs them all, so a bank of many similar tasks
# that missed (per-user prompts) would take minutes per task; the whole contract is still measured after each set.
RANK_TASKS = 8

# precision "fast" opens its candidates with the search deferred (fast.py): it searches only where the all-int8
# graph, which keeping layers fp32 can only slow, is fast enough to win. On the demo it took 296-338 s of a first
# open's 8-12 min where another candidate was far faster (AMX Xeon; AMD Zen 4). The contract then records the miss
# with "deferred"; a later open that is not deferred measures it again, searching.
_DEFERRED = contextvars.ContextVar("promptmux_accuracy_control_deferred", default=False)


@contextlib.contextmanager
def deferred():
    """Within this block, an int8 contract that misses records the miss instead of searching."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def is_deferred() -> bool:
    return _DEFERRED.get()


def was_deferred(entry: dict) -> bool:
    """Whether a recorded contract missed with its search deferred (measured again, searching, by an open that is
    not deferred)."""
    return bool((entry.get("accuracy_control") or {}).get("deferred"))


def applies(rt: Runtime) -> bool:
    """Whether accuracy control can run for this runtime: int8 classifiers on ONNX Runtime, not folded."""
    return (rt.precision == "int8" and rt.spec.family.classifies and rt.backend == "onnxruntime"
            and rt.folded_session is None)


def _graphs(rt: Runtime) -> dict[str, Path]:
    """The deployment's fp32 graphs an int8 runtime quantizes: attribute name -> file."""
    from promptmux.core.folder import GRAPH

    out = {"session": rt.dir / GRAPH}
    noprefix = rt.manifest["graph"].get("noprefix")
    if noprefix and rt.noprefix_session is not None:
        out["noprefix_session"] = rt.dir / noprefix["file"]
    return out


def use_graphs(rt: Runtime, make) -> None:
    """Point rt's sessions at make(fp32 graph path) -> graph file, each made when first used."""
    from .sessions import for_runtime

    for attr, path in _graphs(rt).items():
        setattr(rt, attr, for_runtime(rt, lambda owner, path=path: owner.graph_session(make(path), precision="fp32",
                                                                                      keep_fp32=())))


def _probabilities(rt: Runtime, batches, task: str) -> np.ndarray:
    logits = np.concatenate([rt.forward(ids, mask, task, types) for ids, mask, types in batches])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rank(rt: Runtime, exact, rows: dict[str, list], scores: list | None = None) -> list[int]:
    """Weight-MatMul indices, most sensitive first: each quantized alone, scored on rows {task: batches} (the
    scores, by index, are appended to `scores` where given)."""
    import onnx

    from .quantize import quantize_matmuls, weight_matmuls

    graphs = _graphs(rt)
    names = {p: weight_matmuls(onnx.load(str(p), load_external_data=False).graph) for p in graphs.values()}
    count = len(next(iter(names.values())))
    if any(len(n) != count for n in names.values()):
        raise ValueError("the deployment's graphs list different weight MatMuls; accuracy control cannot map them")
    want = {task: _probabilities(exact, batches, task) for task, batches in rows.items()}
    scores = [] if scores is None else scores
    work = Path(tempfile.mkdtemp(prefix="promptmux-accuracy-"))
    try:
        for i in range(count):
            def alone(path, i=i):
                out = work / f"{path.stem}.{i}.onnx"
                if not out.exists():
                    quantize_matmuls(path, out, [names[path][i]])
                return out

            use_graphs(rt, alone)
            scores.append(float(np.mean([np.abs(_probabilities(rt, batches, task) - want[task]).mean()
                                         for task, batches in rows.items()])))
            for f in work.iterdir():  # a candidate is ~ the model's size: one at a time on disk
                f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [int(i) for i in np.argsort(scores)[::-1]]


def search(rt: Runtime, exact, measure_contract, misses, rows: dict[str, list],
           all_int8: dict | None = None) -> tuple[tuple[int, ...], dict, dict]:
    """(fp32 layers, task report, what was tried): see the module's docstring. measure_contract() measures the
    whole contract with rt as it stands and returns the task report; misses(report): the tasks that miss it
    (precision.py's rule); rows: the missed tasks' calibration batches; all_int8: the report already measured with
    every layer int8, if it was (what stands if no set passes)."""
    from .quantize import int8_graph

    started = time.perf_counter()
    log.warning("int8 missed its accuracy contract: looking for the fewest layers to keep in fp32 (tasks %s)",
                ", ".join(rows))
    order = rank(rt, exact, rows)
    limit = max(1, int(MAX_FP32_SHARE * len(order)))
    tried, k = [], 1
    while True:
        keep = tuple(sorted(order[:k]))
        use_graphs(rt, lambda path, keep=keep: int8_graph(path, True, keep))
        report = measure_contract()
        tried.append({"fp32_layers": len(keep), "missed": misses(report)})
        if not tried[-1]["missed"]:
            break
        if k >= limit:  # back to every layer int8, made now; its contract measured again only if it never was
            keep = ()
            for path in _graphs(rt).values():
                int8_graph(path, True, keep)
            use_graphs(rt, lambda path: int8_graph(path, True, ()))
            report = all_int8 if all_int8 is not None else measure_contract()
            break
        k = min(2 * k, limit)
    summary = {"layers": len(order), "ranking": order, "max_fp32_layers": limit, "tried": tried,
               "passed": bool(keep), "seconds": round(time.perf_counter() - started, 1)}
    log.warning("int8 accuracy control: %s", f"{len(keep)} of {len(order)} layers kept fp32, contract met" if keep
                else f"no set of up to {limit} layers fp32 met the contract; all layers stay int8")
    return keep, report, summary
