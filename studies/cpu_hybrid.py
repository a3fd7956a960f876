"""Which exact CPU engine serves which batch size: ONNX Runtime against OpenVINO (fp32) on the same feeds, in one
process, and what each pays when the other engine ran just before (backend "onnxruntime+openvino",
runtime/routed_session.py).

Measures, on the deployment's graph for batches without prefix rows, the engine call alone (medians):

* per batch shape (rows x tokens): ONNX Runtime and OpenVINO, interleaved;
* B=1 after sleeping 0, 3, 50 and 200 ms (an idle server): what waking the engine's threads costs;
* B=1 on ONNX Runtime right after a B=32 call on OpenVINO, and the reverse.

    python -m studies.cpu_hybrid [DEPLOY] [--shapes 1x64,8x64,16x64,32x64,8x256] [--threads 2] [--rounds 15]
        [--out results/cpu-hybrid.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from studies.capture import session_calls


def engine_feeds(rt, rows: int, tokens: int) -> dict[str, np.ndarray]:
    """The feeds Runtime.forward gives the engine for a mixed batch of the deployment's first two tasks."""
    from promptmux.runtime.routed_session import RoutedSession

    with session_calls(RoutedSession) as calls:
        ids = np.random.default_rng(rows * 1000 + tokens).integers(1000, 20000, (rows, tokens))
        rt.forward(ids, None, [rt.tasks[i % 2] for i in range(rows)])
    return calls[-1][1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy", nargs="?", default="out/minilm-demo")
    p.add_argument("--shapes", default="1x64,8x64,16x64,32x64,8x256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("results/cpu-hybrid.json"))
    args = p.parse_args(argv)
    from promptmux.runtime.runtime import Runtime

    load = [os.getloadavg()[0]]
    rt = Runtime(args.deploy, backend="onnxruntime+openvino", threads=args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    feeds = {s: engine_feeds(rt, *s) for s in shapes}
    routed = rt.noprefix_session if rt.noprefix_session is not None else rt.session
    engines = routed.engines

    def call(name, shape, gap_ms=0.0):
        time.sleep(gap_ms / 1e3)  # an idle server between requests
        t0 = time.perf_counter()
        engines[name].run(feeds[shape])
        return (time.perf_counter() - t0) * 1e3

    per_shape = {}
    for shape in shapes:
        times = {name: [] for name in engines}
        for _ in range(args.rounds if shape[0] * shape[1] < 2048 else max(5, args.rounds // 3)):
            for name in engines:
                for _ in range(2):  # warm: this engine's threads are awake, the other's have settled
                    call(name, shape)
                times[name].extend(call(name, shape) for _ in range(2))
        med = {n: statistics.median(v) for n, v in times.items()}
        per_shape[f"{shape[0]}x{shape[1]}"] = {"positions": int(np.prod(feeds[shape]["attention_mask"].shape)),
                                              "ms": med, "ort_over_ov": med["onnxruntime"] / med["openvino"]}
    small, large = shapes[0], max(shapes, key=lambda s: s[0] * s[1])
    idle = {n: {gap: statistics.median([call(n, small, gap) for _ in range(args.rounds * (3 if gap < 10 else 1))])
                for gap in (0.0, 3.0, 50.0, 200.0)} for n in engines}
    after = {"onnxruntime_small_after_openvino_large": [], "openvino_large_after_onnxruntime_small": []}
    for _ in range(args.rounds // 2 or 1):
        call("openvino", large)
        after["onnxruntime_small_after_openvino_large"].append(call("onnxruntime", small))
        call("onnxruntime", small)
        after["openvino_large_after_onnxruntime_small"].append(call("openvino", large))
    load.append(os.getloadavg()[0])
    result = {"command": "python -m studies.cpu_hybrid " + " ".join(argv or sys.argv[1:]), "deployment": args.deploy,
              "threads": args.threads, "per_shape_ms": per_shape,
              "idle_gap_ms": {n: {f"gap {g:g} ms": v for g, v in d.items()} for n, d in idle.items()},
              "after_the_other_engine_ms": {k: statistics.median(v) for k, v in after.items()},
              "load_avg_start_end": load}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
