"""How precision="fast" times its candidates in one process: alternating single calls against blocks (runtime/fast.py).

    python -m studies.fast_timing DEPLOY [--threads 2] [--out results/fast-timing-....json]

DEPLOY: a classifier deployment whose bf16, ONNX Runtime int8 and OpenVINO int8 contracts are recorded (for example
`promptmux demo --out DIR --precision fast`). The four runtimes (fp32 ONNX Runtime, bf16 and int8 on OpenVINO, int8
on ONNX Runtime) are opened in this one process, as fast.choose opens them, and timed on fast's own workload two
ways: the way fast timed them before (one call each, alternating, median of 5 rounds) and fast._timed as it is now
(blocks of one untimed and 3 timed calls, alternating). Each runtime must have run only its own graph (graph_runs).
The per-process reference for the same candidates is studies/nncf_int8.py (results/nncf-int8-minilm-amd-zen4.md).
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


def single_calls(runs: dict, rounds: int = 5) -> dict[str, float]:
    """fast's timing before blocks: one call per runtime per round, the runtimes alternating."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
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
    from promptmux.runtime import fast

    load_start = load_average()
    rts = {name: Runtime(args.deploy, precision=precision, backend=backend, threads=args.threads)
           for name, (precision, backend) in CANDIDATES.items()}
    runs = {name: fast._workload(rt) for name, rt in rts.items()}
    for run in runs.values():
        run()  # sessions made, graphs compiled
    ways = {"single_calls": single_calls(runs), "blocks": fast._timed(rts)}
    for name, rt in rts.items():
        assert set(rt.graph_runs) == {GRAPHS[name]}, (name, dict(rt.graph_runs))
    result = {"command": "python -m studies.fast_timing " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()],
              "graph_runs": {name: dict(rt.graph_runs) for name, rt in rts.items()},
              "seconds": {way: {n: round(s, 5) for n, s in t.items()} for way, t in ways.items()},
              "speedup_vs_fp32": {way: {n: round(t["fp32"] / s, 3) for n, s in t.items()} for way, t in ways.items()}}
    print(json.dumps(result["speedup_vs_fp32"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
