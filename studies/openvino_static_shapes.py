"""OpenVINO's shape-specialised models against its dynamic-shape model, through Runtime.forward on a classifier
deployment: each (variant, shape) in its own process, rounds alternating, medians. "dynamic" runs with
PROMPTMUX_STATIC_SHAPES=0; "specialised" after the warm-up that compiles the shape's model. Each worker asserts
which model ran its timed batches (graph_runs) and reports the largest difference of its outputs from fp32's.

    python -m studies.openvino_static_shapes DEPLOY [--precisions bf16,fp32] [--shapes 1x64,8x64,32x64,8x256,32x256]
        [--rounds 3] [--runs 15] [--threads 2] [--out results/openvino-static-shapes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def steady_forwards(rt, ids, mask, tasks, runs: int):
    """(the outputs, the seconds of `runs` timed calls, graph_runs of those calls) of rt.forward on one batch, after
    the warm-up that has OpenVINO compile this shape's own model (openvino_session.py) and the wait for it."""
    from promptmux.runtime.openvino_session import SPECIALIZE_AFTER, wait_for_specialisation

    for _ in range(SPECIALIZE_AFTER):
        out = rt.forward(ids, mask, tasks)
    wait_for_specialisation()
    rt.graph_runs.clear()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        rt.forward(ids, mask, tasks)
        times.append(time.perf_counter() - t)
    return out, times, dict(rt.graph_runs)


def worker(deploy: str, variant: str, precision: str, batch: int, tokens: int, runs: int, threads: int) -> dict:
    from promptmux import Runtime

    rt = Runtime(deploy, backend="openvino", precision=precision, threads=threads)
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, tokens))
    mask = np.ones_like(ids)
    for i in range(1, batch):  # varied padding, as a tokenizer pads a batch of texts
        mask[i, tokens - (i * 7) % (tokens // 2):] = 0
    tasks = [rt.tasks[i % len(rt.tasks)] for i in range(batch)]
    out, times, ran = steady_forwards(rt, ids, mask, tasks, runs)
    assert sum(ran.values()) == runs and all(("shape-specialised" in g) == (variant == "specialised") for g in ran), ran
    exact = Runtime(deploy, backend="onnxruntime", threads=threads).forward(ids, mask, tasks)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out, exact))
    return {"ms": 1e3 * float(np.median(times)), "graph_runs": ran, "max_diff_vs_fp32": diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--shapes", default="1x64,8x64,32x64,8x256,32x256")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/openvino-static-shapes.json"))
    p.add_argument("--worker", nargs=4, metavar=("VARIANT", "PRECISION", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        variant, precision, batch, tokens = args.worker
        print(json.dumps(worker(args.deploy, variant, precision, int(batch), int(tokens), args.runs, args.threads)))
        return 0
    from promptmux.runtime.cpu import describe

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    variants = ("dynamic", "specialised")
    times: dict = {}
    details: dict = {}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for precision in args.precisions.split(","):
            for b, s in shapes:
                for v in variants if r % 2 == 0 else variants[::-1]:
                    env = dict(os.environ, PROMPTMUX_STATIC_SHAPES="1" if v == "specialised" else "0")
                    cmd = [sys.executable, "-m", "studies.openvino_static_shapes", args.deploy, "--runs",
                           str(args.runs), "--threads", str(args.threads), "--worker", v, precision, str(b), str(s)]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if done.returncode:
                        raise RuntimeError(done.stderr[-3000:])
                    d = json.loads(done.stdout.strip().splitlines()[-1])
                    key = f"{precision} {v} {b}x{s}"
                    times.setdefault(key, []).append(d["ms"])
                    details[key] = {k: d[k] for k in ("graph_runs", "max_diff_vs_fp32")}
    rows = []
    for precision in args.precisions.split(","):
        for b, s in shapes:
            dyn, spec = (float(np.median(times[f"{precision} {v} {b}x{s}"])) for v in variants)
            rows.append({"precision": precision, "batch": b, "tokens": s, "dynamic_ms": round(dyn, 2),
                         "specialised_ms": round(spec, 2), "speedup": round(dyn / spec, 3),
                         "max_diff_vs_fp32": {v: details[f"{precision} {v} {b}x{s}"]["max_diff_vs_fp32"]
                                              for v in variants}})
            print(f"{precision} B={b} S={s}: dynamic {dyn:.1f} ms, specialised {spec:.1f} ms, {dyn / spec:.2f}x")
    result = {"command": "python -m studies.openvino_static_shapes " + " ".join(argv or sys.argv[1:]),
              "cpu": describe(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "rounds": args.rounds,
              "runs_per_round": args.runs, "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "rows": rows, "times_ms": times, "graph_runs": {k: v["graph_runs"] for k, v in details.items()}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
