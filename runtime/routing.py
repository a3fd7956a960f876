"""Where backend "onnxruntime+openvino" hands batches from ONNX Runtime to OpenVINO, measured on this CPU.

The crossover depends on the CPU and on the model: on the Intel machine the two engines tied at 8 x 64 tokens
(the first fixed threshold, 1,024 positions, came from there); on an AMD Zen 3 ONNX Runtime was still 25 % faster
at 8 x 64 and OpenVINO ahead only at 32 x 64 (issue 21). So the first open of a deployment with this backend on a
CPU kind times both engines on SIZES (the batches the benchmarks use), each in a process of its own (timing.py: in
one process their thread pools distort each other), alternating, and keeps the split that costs least; the
measurement goes into the manifest under "routing", keyed by the CPU and the thread count, and later opens on the
same kind of CPU read it. `Runtime(route_positions=N)` sets the split by hand and measures nothing.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import weakref
from typing import TYPE_CHECKING

from .timing import CLASSIFIER_SHAPES, time_apart

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")

ROUTING_KEY = "routing"
SIZES = CLASSIFIER_SHAPES  # (rows, tokens) timed on each engine: the benchmarks' batches
ROUNDS = 5  # of timing.BLOCK calls per engine and size, the median of the rounds' medians
# OpenVINO takes a size when its median is MARGIN faster, or when it was faster in each of the ROUNDS rounds (a
# tie does that by chance once in 2**5 = 32). The second rule: at 8 x 64 on the AMX machine OpenVINO was 3-7 %
# ahead, so MARGIN alone kept that size on ONNX Runtime about half the time; in three timings it won 7 of 7, 5 of 7
# (results/routing-rounds-minilm-intel-amx.json) and 5 of 5 rounds.
MARGIN = 0.05
# Every size gets FIRST_ROUNDS; only a size those leave open (OpenVINO ahead in each, by less than MARGIN) gets the
# rest: elsewhere more rounds could not change the split, and they are most of the time (MiniLM: about 10 s).
FIRST_ROUNDS = 3
ENGINES = ("onnxruntime", "openvino")
DEFAULT_SMALL_POSITIONS = 1024  # until measured (and where no task can be timed): the Intel machine's tie, 8 x 64 + 12


class Routing:
    """The split shared by a runtime's routed sessions: batches of up to `small_positions` positions (rows x
    width, virtual tokens included) run on ONNX Runtime (None: every batch), larger ones on OpenVINO. `force`
    sends every batch to one engine while the split is measured."""

    def __init__(self, small_positions: int | None = DEFAULT_SMALL_POSITIONS, given: bool = False):
        self.small_positions = small_positions
        self.given = given  # set by hand: nothing is measured
        self.measured: str | None = None  # when the split in use was measured on this CPU
        self.force: str | None = None
        self.last_positions = 0
        # the routed sessions that follow this split, held weakly: each holds this split, and a cycle would keep both
        # engines' memory until Python's cycle collector ran (sessions.for_runtime)
        self.sessions: weakref.WeakSet = weakref.WeakSet()

    def describe(self) -> dict:
        return {"small_positions": self.small_positions, "engines": list(self.picks()), "measured": self.measured}

    def picks(self) -> tuple[str, ...]:
        """The engines this split can send a batch to."""
        return (("onnxruntime",) if self.small_positions is None else ("openvino",) if self.small_positions == 0
                else ENGINES)

    def release_unused(self) -> None:
        """Drop an engine the split never picks (built while the split was measured): its memory goes back."""
        for session in self.sessions:
            for name in set(ENGINES) - set(self.picks()):
                session.engines[name].release()

    def engine_for(self, rows: int, width: int) -> str:
        self.last_positions = rows * width
        if self.force:
            return self.force
        small = self.small_positions
        return "onnxruntime" if small is None or rows * width <= small else "openvino"


def split(sizes: list[dict]) -> int | None:
    """The positions up to which ONNX Runtime should run, from per-size timings ({"positions", "onnxruntime_ms",
    "openvino_ms"}, and where measured "rounds" with "openvino_ahead": the rounds OpenVINO won): the cut whose
    summed time, each size relative to its faster engine, is least. A size OpenVINO is not clearly faster at (by
    MARGIN, or in every one of at least ROUNDS rounds) counts as a tie, and ties keep ONNX Runtime. None: ONNX
    Runtime at every size.

    The cut sits between the last size ONNX Runtime keeps and the next (their geometric mean), not on it: sizes are
    timed with the first task, and another task's longer prompt adds positions to a batch of the same rows. With
    the cut at 72 (1 x 64 with 8 virtual tokens), single rows of the demo's 12-token task went to OpenVINO, mixed
    traffic at B = 1 switched engine at every batch, and ran at 1.37x PEFT against 1.66x on ONNX Runtime alone
    (results/exact-3d-minilm-intel-amx.md)."""
    points = sorted(sizes, key=lambda s: s["positions"])

    def openvino_ms(s):  # not clearly faster counts as a tie
        ort, ov = s["onnxruntime_ms"], s["openvino_ms"]
        every_round = s.get("rounds", 0) >= ROUNDS and s.get("openvino_ahead") == s["rounds"]
        return ov if _by_margin(s) or (ov < ort and every_round) else max(ov, ort)

    def cost(cut):
        return sum((s["onnxruntime_ms"] if cut is None or s["positions"] <= cut else openvino_ms(s))
                   / min(s["onnxruntime_ms"], s["openvino_ms"]) for s in points)

    cuts = [None] + [s["positions"] for s in reversed(points[:-1])] + [0]
    best = min(cuts, key=lambda c: round(cost(c), 6))  # min keeps the first of equals: the most ONNX Runtime
    if not best:  # None or 0: one engine at every size
        return best
    after = next(s["positions"] for s in points if s["positions"] > best)
    return round(math.sqrt(best * after))


def _by_margin(s: dict) -> bool:
    return s["openvino_ms"] < (1 - MARGIN) * s["onnxruntime_ms"]


def _open(s: dict) -> bool:
    """More rounds could still give this size to OpenVINO: it won each so far, by less than MARGIN."""
    return s["openvino_ahead"] == s["rounds"] < ROUNDS and not _by_margin(s)


def paired_rounds(timed: dict, i: int) -> list[tuple[float, float]]:
    """(ONNX Runtime, OpenVINO) seconds in each round of shape i, from time_apart's answer for ENGINES."""
    return list(zip(*(timed[e]["rounds"][i] for e in ENGINES)))


def size_record(rows: int, tokens: int, positions: int, rounds: list[tuple[float, float]]) -> dict:
    """A size's record from its rounds' (ONNX Runtime, OpenVINO) seconds: what split() reads."""
    medians = [statistics.median(times) for times in zip(*rounds)]
    return {"rows": rows, "tokens": tokens, "positions": positions,
            **{f"{e}_ms": round(1e3 * m, 3) for e, m in zip(ENGINES, medians)},
            "rounds": len(rounds), "openvino_ahead": sum(ov < ort for ort, ov in rounds)}


def key(threads: int | None) -> str:
    """The CPU kind and the threads the engines run with (given, or PROMPTMUX_THREADS, or one per core)."""
    from .cpu import default_threads, describe

    return f"{describe()}; threads={threads or default_threads() or 'default'}"


def measure(rt: Runtime) -> dict:
    """Time both engines of `rt` (a runtime on backend onnxruntime+openvino) on SIZES with its first task, each
    engine in a process of its own (timing.py), kept to its engine by a split given by hand."""
    virtual = rt.bank.view(rt.bank.page(1)[0][0]).num_virtual_tokens
    shapes = list(dict.fromkeys((rows, min(tokens, rt.max_positions - virtual) if rt.max_positions else tokens)
                                for rows, tokens in SIZES))
    shapes = [s for s in shapes if s[1] >= 1]
    configs = {e: {"backend": "onnxruntime+openvino", "route_positions": 0, "threads": rt.threads, "force": e}
               for e in ENGINES}
    started = time.perf_counter()
    timed = time_apart(rt.dir, configs, shapes, rounds=FIRST_ROUNDS)
    positions = timed[ENGINES[0]]["positions"]
    rounds = [paired_rounds(timed, i) for i in range(len(shapes))]
    sizes = [size_record(*shape, positions[i], rounds[i]) for i, shape in enumerate(shapes)]
    more = [i for i, s in enumerate(sizes) if _open(s)]
    if more:
        timed = time_apart(rt.dir, configs, [shapes[i] for i in more], rounds=ROUNDS - FIRST_ROUNDS)
        for j, i in enumerate(more):
            rounds[i] += paired_rounds(timed, j)
            sizes[i] = size_record(*shapes[i], positions[i], rounds[i])
    return {"small_positions": split(sizes), "sizes": sizes, "seconds": round(time.perf_counter() - started, 2),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def resolve(rt: Runtime, threads: int | None) -> dict | None:
    """Set rt.routing from the manifest's record for this CPU, or measure it now and record it. Returns the record
    (None where the split was given by hand or the deployment has no task to time)."""
    from promptmux.core.folder import deployment_lock, write_manifest

    if rt.routing.given or len(rt.bank) == 0:  # (rt.tasks would read every name of a million-task bank)
        why = "given" if rt.routing.given else "the default: no task to time"
        rt.backend_reason += f"; batches of up to {rt.routing.small_positions} positions on ONNX Runtime ({why})"
        return None
    cpu = key(threads)
    record = (rt.manifest.get(ROUTING_KEY) or {}).get(cpu)
    fresh = record is None
    if fresh:
        log.warning("timing ONNX Runtime against OpenVINO once on this CPU to route batches by size (about 25 s on "
                    "2 cores; kept in the manifest for this kind of CPU) ...")
        record = measure(rt)
        rt.graph_runs.clear()  # the timing batches are not traffic
        try:
            with deployment_lock(rt.dir):
                write_manifest(rt.dir, lambda m: m.setdefault(ROUTING_KEY, {}).__setitem__(cpu, record))
        except OSError as e:  # a read-only deployment: the split holds for this process
            log.warning("could not record the routing in %s: %s", rt.dir, e)
    small = rt.routing.small_positions = record["small_positions"]
    rt.routing.measured = record["measured"]
    rt.routing.release_unused()
    said = ("ONNX Runtime at every size" if small is None else "OpenVINO at every size" if small == 0 else
            f"batches of up to {small} positions on ONNX Runtime, larger on OpenVINO")
    rt.backend_reason += f"; {said}, measured on this CPU {record['measured']}"
    if fresh:
        log.warning("routing: %s (measured in %s s)", said, record["seconds"])
    return record
