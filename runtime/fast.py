"""precision="fast": the fastest precision that meets its accuracy contract on this CPU, chosen by measurement.

The candidates are the non-exact precisions (precision.py) on the backends that run them: bf16 (OpenVINO, on CPUs
with AMX or AVX512-BF16), int8 on ONNX Runtime (dynamic int8 classifiers with accuracy control, weight-only int8
decoding) and int8 on OpenVINO (classifiers: NNCF's static int8, openvino_int8.py). Which one is faster depends on
the CPU: on Intel AMX bf16 tiles, on AMD Zen 3 (no bf16) only int8 is there, on Zen 4 all three run, int8 beat bf16
for classifiers (results/int8-classifier-bench-amd-zen4.md) and NNCF's int8 beat ONNX Runtime's
(results/nncf-int8-minilm-amd-zen4.json), on an AMX Xeon bf16 and OpenVINO's int8 trade places with the length
(results/exact-and-fast-minilm-intel-amx.md). So each candidate the CPU can run is opened (its contract measured, or
read from the manifest), then timed against fp32 ONNX Runtime on the benchmarks' batch sizes (timing.py: each in a
process of its own, in alternating blocks); a candidate's speed is the geometric mean of its speedups over those
sizes. The fastest that meets its contract and beats fp32 wins; otherwise fp32 runs (exact). An int8 that misses
its contract with every layer int8 is timed so too, and accuracy control searches for layers to keep fp32 only if
that speed (the most the candidate can reach: fp32 layers only slow it) could win or tie; the search took 5-6
minutes of the demo's first open on an AMX Xeon and on an AMD Zen 4, where another candidate was far faster.
Candidates within TIE of the fastest are a tie, which the one that kept most of fp32's answers on the calibration
inputs wins (its worst task's share: kept()): on an AMX Xeon bf16 and OpenVINO's int8 ran within 3 % of each other,
either ahead by the run, while on the demo's calibration rows bf16 kept all of fp32's predictions and the int8 98 %.
The choice, every candidate's figures and the reason are recorded in the manifest under "fast", keyed by the CPU
(cpu.describe()), so a deployment copied to another kind of CPU chooses again there; a later open on the same CPU
reuses the choice while the chosen precision's contract still covers the bank's tasks.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from promptmux.core.folder import deployment_lock, write_manifest

from . import accuracy_control, cpu
from .calibration import items_digest
from .contract_record import record_key, rows_changed, stale
from .errors import BackendUnavailable
from .precision import measured_rows, misses
from .timing import CLASSIFIER_SHAPES, GENERATION_SHAPES, time_apart

log = logging.getLogger("promptmux.runtime")

# name -> (precision, backend). Two int8s: which one is faster depends on the CPU (openvino_int8.py).
CANDIDATES = {"bf16": ("bf16", "openvino"), "int8": ("int8", "onnxruntime"), "int8/openvino": ("int8", "openvino")}
FAST_KEY = "fast"
# Speedups this close to the fastest's are a tie: timed apart over the five sizes on one AMX Xeon, bf16 and
# OpenVINO's int8 came within 3 % of each other, either one ahead by the run
# (results/fast-choice-timed-apart-minilm-intel-amx.json; python -m studies.fast_choice repeats the choice).
TIE = 0.05


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def kept(contract: dict) -> float:
    """The share of fp32's answers a contract's worst task kept: predictions for a classifier, greedy tokens for a
    language model (with labelled rows, its rows whose tokens are all fp32's)."""
    shares = [r.get("prediction_agreement", r.get("token_agreement")) for r in contract["tasks"].values()]
    return min((x for x in shares if x is not None), default=0.0)


def _time(deploy_dir: Path, threads: int | None, configs: dict, shapes) -> tuple[dict, dict]:
    """({name: seconds per shape}, time_apart's report) for the configurations and fp32 ONNX Runtime, each in a
    process of its own; nothing where there is nothing to compare (fp32 is timed only against a candidate)."""
    if not configs:
        return {}, {}
    timed = time_apart(deploy_dir, {"fp32": {"backend": "onnxruntime", "threads": threads}, **configs}, shapes)
    return {name: t["seconds"] for name, t in timed.items()}, timed


def _speedups(seconds: dict) -> dict[str, float]:
    return {name: _geomean([f / s for f, s in zip(seconds["fp32"], ts)]) for name, ts in seconds.items()
            if name != "fp32"}


def _missed(contract: dict) -> dict:
    """What a candidate's contract missed, figures and all, so that a choice of fp32 says why."""
    return {"missed": misses(contract["tasks"])} if not contract["passed"] else {}


def _why(figures: dict) -> str:
    missed = "missed its contract" + (f" ({'; '.join(figures['missed'])})" if figures.get("missed") else "")
    return missed + (f"; accuracy control {figures['accuracy_control']}" if "accuracy_control" in figures else "")


def recorded(manifest: dict, cpu_kind: str) -> dict | None:
    return ((manifest.get(FAST_KEY) or {}).get(cpu_kind)) or None


def choose(deploy_dir: Path, threads: int | None, calibration, Runtime) -> dict:
    """Measure the candidates (each opened as Runtime(deploy_dir, precision=..., backend=...)) and record the choice;
    returns the record ({"precision", "backend", "reason", ...})."""
    cpu_kind = cpu.describe()
    passing, deferred, figures, classifies = {}, {}, {}, True
    with accuracy_control.deferred():  # int8's search only where it could win (below)
        for name, (precision, backend) in CANDIDATES.items():
            try:
                rt = Runtime(deploy_dir, precision=precision, backend=backend, threads=threads,
                             calibration=calibration)
            except BackendUnavailable as e:
                figures[name] = {"runs": False, "why": str(e)}
                continue
            classifies = rt.spec.family.classifies
            figures[name] = {"runs": True, "backend": rt.backend, "contract_passed": rt.contract["passed"],
                             "kept": round(kept(rt.contract), 4), **_missed(rt.contract)}
            config = {"precision": precision, "backend": backend, "threads": threads}
            if rt.contract["passed"]:
                passing[name] = config
            elif accuracy_control.was_deferred(rt.contract):
                deferred[name] = {**config, "defer_accuracy_control": True}
            del rt  # its engines' threads and memory: the timing runs elsewhere
    shapes = CLASSIFIER_SHAPES if classifies else GENERATION_SHAPES
    seconds, timed = _time(deploy_dir, threads, {**passing, **deferred}, shapes)
    speedups = _speedups(seconds)
    best = max((speedups[name] for name in passing), default=1.0)
    searched = False
    for name, config in deferred.items():
        # Keeping layers fp32 only slows the graph: all int8, it is the fastest this candidate can be.
        bound = speedups.pop(name)
        figures[name]["all_int8_speedup_vs_fp32"] = round(bound, 3)
        if bound <= 1 or bound < max(best, 1.0) * (1 - TIE):
            figures[name]["accuracy_control"] = (f"not searched: with every layer int8 it missed its contract and ran "
                                                 f"{bound:.2f}x fp32, too slow to win against {best:.2f}x")
            continue
        precision, backend = CANDIDATES[name]
        rt = Runtime(deploy_dir, precision=precision, backend=backend, threads=threads, calibration=calibration)
        figures[name].pop("missed", None)
        limit = (rt.contract.get("accuracy_control") or {}).get("max_fp32_layers")
        figures[name].update(contract_passed=rt.contract["passed"], kept=round(kept(rt.contract), 4),
                             accuracy_control="searched: every layer int8 was fast enough to win" + (
                                 "" if rt.contract["passed"] else f"; no set of up to {limit} layers fp32 met it"),
                             **_missed(rt.contract))
        if rt.contract["passed"]:
            passing[name] = {k: v for k, v in config.items() if k != "defer_accuracy_control"}
            searched = True
        del rt
    if searched:  # timed again, all together: its graphs now keep layers fp32
        seconds, timed = _time(deploy_dir, threads, passing, shapes)
        speedups = _speedups(seconds)
    for name, speedup in speedups.items():
        figures[name].update(seconds=[round(s, 5) for s in seconds[name]], speedup_vs_fp32=round(speedup, 3),
                             speedups=[round(f / s, 3) for f, s in zip(seconds["fp32"], seconds[name])],
                             graph_runs=timed[name]["graph_runs"])  # which graph the timing ran (int8: its own)
    faster = {name: x for name, x in speedups.items() if x > 1}
    if timed and timed["fp32"].get("tokens"):  # the shapes as they ran: tokens cut to the positions (timing.workload)
        shapes = [(s[0], int(tokens), *s[2:]) for s, tokens in zip(shapes, timed["fp32"]["tokens"])]
    where = " x ".join(("rows", "tokens", "new tokens")[: len(shapes[0])])
    over = f"geometric mean over {where} = {', '.join('x'.join(map(str, s)) for s in shapes)}"
    if faster:
        fastest = max(faster, key=faster.get)
        tied = [name for name, x in faster.items() if x >= faster[fastest] * (1 - TIE)]
        chosen = max(tied, key=lambda name: (figures[name]["kept"], faster[name]))
        reason = (f"{chosen} meets its accuracy contract and ran {faster[chosen]:.2f}x faster than fp32 here "
                  f"({over}; each precision in its own process), the fastest of {', '.join(sorted(passing))}")
        if chosen != fastest:
            reason = (f"{chosen} meets its accuracy contract and ran {faster[chosen]:.2f}x faster than fp32 here, "
                      f"within {TIE:.0%} of {fastest}'s {faster[fastest]:.2f}x (a tie: timing's own spread), and "
                      f"kept more of fp32's answers on the calibration inputs ({figures[chosen]['kept']:.1%} against "
                      f"{figures[fastest]['kept']:.1%}, the worst task's); {over}, each precision in its own process")
    else:
        chosen = "fp32"
        reason = ("no non-exact precision both met its accuracy contract and beat fp32 on this CPU: "
                  + "; ".join(f"{p}: " + (f["why"] if not f["runs"] else _why(f)
                                          if not f["contract_passed"] else f"{f['speedup_vs_fp32']}x fp32")
                              for p, f in figures.items()))
    precision, backend = CANDIDATES.get(chosen, ("fp32", None))
    record = {"precision": precision, "backend": backend, "choice": chosen, "reason": reason, "candidates": figures,
              "shapes": [list(s) for s in shapes] if seconds else None,
              "fp32_seconds": [round(s, 5) for s in seconds["fp32"]] if seconds else None,
              "fp32_graph_runs": timed["fp32"]["graph_runs"] if timed else None,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log.warning("precision fast: %s (%s)", chosen, reason)
    try:
        with deployment_lock(deploy_dir):
            write_manifest(deploy_dir, lambda m: m.setdefault(FAST_KEY, {}).__setitem__(cpu_kind, record))
    except OSError as e:  # a read-only deployment: the choice holds for this process
        log.warning("could not record the fast precision in %s: %s", deploy_dir, e)
    return record


def resolve(deploy_dir: Path, manifest: dict, threads: int | None, calibration, Runtime, bank,
            family) -> tuple[str, dict]:
    """(precision to run, its record): the manifest's choice for this CPU while it holds, else measured now, each
    candidate opened as Runtime(deploy_dir, precision=...) (the caller's class: runtime.py imports this module).
    bank, family: the deployment's, which the contracts the choice was made from must still cover (_still_holds);
    calibration: normalised (calibration.given_items)."""
    record = recorded(manifest, cpu.describe())
    if record is not None:  # its contracts must have been measured on the rows they would be measured on now
        try:
            items = measured_rows(Path(deploy_dir), manifest, bank, calibration)[0]
        except ValueError:  # kept rows that no longer read: the contracts, measured again, say so
            items = ()
        if not _still_holds(manifest, record, bank, family, None if items is None else items_digest(items)):
            record = None
    if record is None:
        record = choose(Path(deploy_dir), threads, calibration, Runtime)
    return record["precision"], record


def _still_holds(manifest: dict, record: dict, bank, family, digest: str | None) -> bool:
    """The recorded choice holds while the contracts it was made from hold (contract_record.stale: the bank's tasks,
    this CPU, the graphs, the method; a candidate left unsearched still counts) and were measured on the rows they
    would be measured on now (`digest`: the given calibration's, else the deployment's kept rows'; rows_changed), and
    the chosen precision's passed. Else a contract measured again at open could
    miss while fast still ran its precision (or pass, where fp32 was chosen for its miss): the choice is made again."""
    entries = manifest.get("precision") or {}
    for name, figures in record["candidates"].items():
        precision, backend = CANDIDATES.get(name, (name, figures.get("backend")))  # recorded before: the name
        entry = entries.get(record_key(backend, precision))
        if figures.get("runs") and (stale(entry, backend, precision, bank, family, searched=False)
                                    or rows_changed(entry, backend, precision, digest)):
            return False
    if record["precision"] == "fp32":
        return True
    chosen = record.get("choice", record["precision"])
    entry = entries.get(record_key(record["candidates"][chosen]["backend"], record["precision"]))
    return bool(entry and entry.get("passed"))
