"""precision="fast": the fastest precision that meets its accuracy contract on this CPU, chosen by measurement.

The candidates are the non-exact precisions (precision.py) on the backends that run them: bf16 (OpenVINO, on CPUs
with AMX or AVX512-BF16), int8 on ONNX Runtime (dynamic int8 classifiers with accuracy control, weight-only int8
decoding) and int8 on OpenVINO (classifiers: NNCF's static int8, openvino_int8.py). Which one is faster depends on
the CPU: on Intel AMX bf16 tiles, on AMD Zen 3 (no bf16) only int8 is there, on Zen 4 all three run, int8 beat bf16
for classifiers (results/int8-classifier-bench-amd-zen4.md) and NNCF's int8 beat ONNX Runtime's
(results/nncf-int8-minilm-amd-zen4.json). So each candidate the CPU can run is opened (its contract measured, or
read from the manifest), then timed on one workload against fp32 ONNX Runtime, in alternating blocks (_timed), the
median of ROUNDS. The fastest that meets its contract and beats fp32 wins; otherwise fp32 runs (exact). The choice,
every candidate's figures and the reason are recorded in the manifest under "fast", keyed by the CPU
(cpu.describe()), so a deployment copied to another kind of CPU chooses again there; a later open on the same CPU
reuses the choice while the chosen precision's contract still covers the bank's tasks.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.folder import deployment_lock, write_manifest

from . import cpu
from .errors import BackendUnavailable
from .precision import record_key

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")

# name -> (precision, backend). Two int8s: which one is faster depends on the CPU (openvino_int8.py).
CANDIDATES = {"bf16": ("bf16", "openvino"), "int8": ("int8", "onnxruntime"), "int8/openvino": ("int8", "openvino")}
ROUNDS = 5
BLOCK = 3  # timed calls of one runtime in a row (see _timed)
FAST_KEY = "fast"


def _workload(rt: Runtime):
    """A callable running one representative batch: B=8 x 64 tokens for a classifier, 4 prompts x 16 new tokens
    for a language model (shorter where the model's positions are fewer)."""
    task = rt.tasks[0]
    rows, length, new = (8, 64, 0) if rt.spec.family.classifies else (4, 16, 16)
    if rt.max_positions:
        length = max(1, min(length, rt.max_positions - rt.bank.view(task).num_virtual_tokens - new))
    vocab = rt.dims.vocab_size
    ids = np.random.default_rng(0).integers(min(1000, vocab // 2), vocab, size=(rows, length))
    mask = np.ones_like(ids)
    if rt.spec.family.classifies:
        return lambda: rt.forward(ids, mask, task)
    return lambda: rt.generate({"input_ids": ids, "attention_mask": mask}, task, max_new_tokens=new, eos_token_id=[])


def _timed(runtimes: dict) -> dict[str, float]:
    """Median seconds of each runtime's workload: in each of ROUNDS rounds (the order reversed every other round),
    each runtime in a block of one untimed call and BLOCK timed ones. Blocks, not one call each: ONNX Runtime's
    threads spin on after a call and slow the next engine's call, so alternating single calls charged OpenVINO for
    them (studies/fast_timing.py, results/fast-timing-minilm-amd-zen4.json; demo, Zen 4: bf16 1.20x and OpenVINO's
    int8 1.69x fp32 that way, 1.85x and 2.59x in blocks, ONNX Runtime's int8 2.23x / 2.18x either way; each in its
    own process, studies/nncf_int8.py: OpenVINO's int8 2.52x, ONNX Runtime's 2.05x at B=8)."""
    runs = {name: _workload(rt) for name, rt in runtimes.items()}
    for run in runs.values():
        run()  # warm-up: sessions made, graphs compiled
    times = {name: [] for name in runs}
    for r in range(ROUNDS):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            runs[name]()  # lets the previous engine's threads settle
            block = []
            for _ in range(BLOCK):
                t = time.perf_counter()
                runs[name]()
                block.append(time.perf_counter() - t)
            times[name].append(statistics.median(block))
    return {name: statistics.median(ts) for name, ts in times.items()}


def recorded(manifest: dict, cpu_kind: str) -> dict | None:
    return ((manifest.get(FAST_KEY) or {}).get(cpu_kind)) or None


def choose(deploy_dir: Path, threads: int | None, calibration, Runtime) -> dict:
    """Measure the candidates (each opened as Runtime(deploy_dir, precision=..., backend=...)) and record the choice;
    returns the record ({"precision", "backend", "reason", ...})."""
    cpu_kind = cpu.describe()
    opened, figures = {}, {}
    for name, (precision, backend) in CANDIDATES.items():
        try:
            rt = Runtime(deploy_dir, precision=precision, backend=backend, threads=threads, calibration=calibration)
        except BackendUnavailable as e:
            figures[name] = {"runs": False, "why": str(e)}
            continue
        figures[name] = {"runs": True, "backend": rt.backend, "contract_passed": rt.contract["passed"]}
        if rt.contract["passed"]:
            opened[name] = rt
    # fp32 is opened only to be timed against a candidate that met its contract
    seconds = _timed({"fp32": Runtime(deploy_dir, backend="onnxruntime", threads=threads), **opened}) if opened else {}
    for precision, s in seconds.items():
        if precision != "fp32":
            figures[precision].update(seconds=round(s, 5), speedup_vs_fp32=round(seconds["fp32"] / s, 3))
    faster = {p: s for p, s in seconds.items() if p != "fp32" and s < seconds["fp32"]}
    if faster:
        chosen = min(faster, key=faster.get)
        reason = (f"{chosen} meets its accuracy contract and ran {seconds['fp32'] / faster[chosen]:.2f}x faster than "
                  f"fp32 here, the fastest of {', '.join(sorted(opened))}")
    else:
        chosen = "fp32"
        reason = ("no non-exact precision both met its accuracy contract and beat fp32 on this CPU: "
                  + "; ".join(f"{p}: " + (f["why"] if not f["runs"] else "missed its contract"
                                          if not f["contract_passed"] else f"{f['speedup_vs_fp32']}x fp32")
                              for p, f in figures.items()))
    precision, backend = CANDIDATES.get(chosen, ("fp32", None))
    record = {"precision": precision, "backend": backend, "choice": chosen, "reason": reason, "candidates": figures,
              "fp32_seconds": round(seconds["fp32"], 5) if seconds else None,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log.warning("precision fast: %s (%s)", chosen, reason)
    try:
        with deployment_lock(deploy_dir):
            write_manifest(deploy_dir, lambda m: m.setdefault(FAST_KEY, {}).__setitem__(cpu_kind, record))
    except OSError as e:  # a read-only deployment: the choice holds for this process
        log.warning("could not record the fast precision in %s: %s", deploy_dir, e)
    return record


def resolve(deploy_dir: Path, manifest: dict, threads: int | None, calibration, Runtime) -> tuple[str, dict]:
    """(precision to run, its record): the manifest's choice for this CPU while it holds, else measured now, each
    candidate opened as Runtime(deploy_dir, precision=...) (the caller's class: runtime.py imports this module)."""
    record = recorded(manifest, cpu.describe())
    if record is None or calibration is not None or not _still_holds(manifest, record):
        record = choose(Path(deploy_dir), threads, calibration, Runtime)
    return record["precision"], record


def _still_holds(manifest: dict, record: dict) -> bool:
    """The recorded choice holds while the chosen precision's contract is recorded as passed (a change of tasks
    measures it again at open, which may then miss: the choice is then made again)."""
    if record["precision"] == "fp32":
        return True
    chosen = record.get("choice", record["precision"])  # recorded before int8 had two backends: the name
    entry = (manifest.get("precision") or {}).get(record_key(record["candidates"][chosen]["backend"],
                                                              record["precision"]))
    return bool(entry and entry.get("passed"))
