"""How precision="fast" times its candidates: in one process (alternating single calls; alternating blocks) against
each in a process of its own (runtime/timing.py, what fast.py does now).

    python -m studies.fast_timing DEPLOY [--threads 2] [--out results/fast-timing-....json]

DEPLOY: a classifier deployment whose bf16, ONNX Runtime int8 and OpenVINO int8 contracts are recorded (for example
`promptmux demo --out DIR --precision fast`). The four configurations (fp32 ONNX Runtime, bf16 and int8 on OpenVINO,
int8 on ONNX Runtime) are timed on B = 8 x 64 tokens three ways: opened in this one process and called one at a time
in turn (fast's first timing), opened in this process and called in blocks of one untimed and 3 timed calls (its
second), and each in a process of its own (timing.time_apart, its third). Each must have run only its own graph
(graph_runs), in this process and in the others. The per-process reference for the same candidates over a whole
benchmark is `promptmux bench` (results/exact-and-fast-minilm-intel-amx.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CANDIDATES = {"fp32": ("fp32", "onnxruntime"), "bf16": ("bf16", "openvino"), "int8": ("int8", "onnxruntime"),
              "int8/openvino": ("int8", "openvino")}
GRAPHS = {"fp32": "model_noprefix.onnx", "bf16": "model_noprefix.onnx", "int8": "model_noprefix.int8.onnx",
          "int8/openvino": "model_noprefix.int8.xml"}
SHAPE = (8, 64)
ROUNDS = 5


def single_calls(runs: dict) -> dict[str, float]:
    """One call per runtime per round, the runtimes alternating."""
    times = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def blocks(runs: dict, block: int = 3) -> dict[str, float]:
    """Per round each runtime in a block of one untimed and `block` timed calls, the order reversed every other
    round; the median of the blocks' medians."""
    times = {name: [] for name in runs}
    for r in range(ROUNDS):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            runs[name]()
            ts = []
            for _ in range(block):
                t = time.perf_counter()
                runs[name]()
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.fast_timing", description=__doc__.splitlines()[0])
    p.add_argument("deploy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    from promptmux import Runtime
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.runtime.timing import time_apart, workload

    load_start = load_average()
    configs = {name: {"precision": precision, "backend": backend, "threads": args.threads}
               for name, (precision, backend) in CANDIDATES.items()}
    apart = time_apart(args.deploy, configs, [SHAPE], rounds=ROUNDS)
    rts = {name: Runtime(args.deploy, **kwargs) for name, kwargs in configs.items()}
    runs = {name: workload(rt, SHAPE)[0] for name, rt in rts.items()}
    for run in runs.values():
        run()  # sessions made, graphs compiled
    ways = {"one_process_single_calls": single_calls(runs), "one_process_blocks": blocks(runs),
            "apart": {name: t["seconds"][0] for name, t in apart.items()}}
    graph_runs = {"one_process": {name: dict(rt.graph_runs) for name, rt in rts.items()},
                  "apart": {name: t["graph_runs"] for name, t in apart.items()}}
    for where in graph_runs.values():
        for name, runs_ in where.items():
            assert set(runs_) == {GRAPHS[name]}, (name, runs_)
    result = {"command": "python -m studies.fast_timing " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()],
              "shape": list(SHAPE), "graph_runs": graph_runs,
              "seconds": {way: {n: round(s, 5) for n, s in t.items()} for way, t in ways.items()},
              "speedup_vs_fp32": {way: {n: round(t["fp32"] / s, 3) for n, s in t.items()} for way, t in ways.items()}}
    print(json.dumps(result["speedup_vs_fp32"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
