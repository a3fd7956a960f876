"""The last layer at the pooled position only (export/pooled_row.py) against the whole last layer: the demo exported
both ways (each export in a process of its own, onnx_export.POOLED_ROW off and on), then each (variant, engine)
opened in a process of its own and timed in alternating rounds (runtime/timing.time_apart), medians and per-round
ratios. Each process asserts which graph ran (graph_runs); the outputs of the two variants are compared on both
engines for mixed-task batches with padding.

    python -m studies.pooled_row [--engines onnxruntime,openvino] [--shapes 1x64,8x64,32x64,8x256] [--rounds 5]
        [--threads 2] [--out results/pooled-row.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("whole", "pooled")

EXPORT = r"""
import sys
from pathlib import Path
from promptmux.export import onnx_export
from promptmux.export.deploy import export_deployment
from promptmux.demo import ADAPTERS, TASKS, base_model_dir
onnx_export.POOLED_ROW = sys.argv[2] == "pooled"
export_deployment(base_model_dir(), {t: ADAPTERS / t for t in TASKS}, Path(sys.argv[1]), quiet=True)
"""


def pooled_nodes(graph: Path) -> int:
    import onnx

    from promptmux.export.pooled_row import SUFFIX

    return sum(n.output[0].endswith(SUFFIX) for n in onnx.load(str(graph), load_external_data=False).graph.node)


def largest_difference(deploys: dict[str, Path], engine: str, threads: int) -> float:
    from promptmux import Runtime

    runtimes = {v: Runtime(d, backend=engine, threads=threads) for v, d in deploys.items()}
    rng = np.random.default_rng(0)
    worst = 0.0
    for rows, tokens in ((1, 64), (5, 23), (8, 64)):
        ids = rng.integers(1000, 20000, (rows, tokens))
        mask = np.ones_like(ids)
        mask[1:, tokens // 2:] = 0  # padded rows beside full ones
        tasks = [runtimes["whole"].tasks[i % len(runtimes["whole"].tasks)] for i in range(rows)]
        a, b = (runtimes[v].forward(ids, mask, tasks) for v in VARIANTS)
        worst = max(worst, max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
    return worst


def main(argv=None) -> int:
    from promptmux.runtime.cpu import describe
    from promptmux.runtime.timing import time_apart

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="onnxruntime,openvino")
    p.add_argument("--shapes", default="1x64,8x64,32x64,8x256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/pooled-row.json"))
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    engines = args.engines.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="pooled-row-"))
    deploys = {v: tmp / v for v in VARIANTS}
    for v, d in deploys.items():
        subprocess.run([sys.executable, "-c", EXPORT, str(d), v], check=True)
    nodes = {v: pooled_nodes(d / "model_noprefix.onnx") for v, d in deploys.items()}
    assert nodes["whole"] == 0 < nodes["pooled"], nodes
    diffs = {e: largest_difference(deploys, e, args.threads) for e in engines}
    load_start, started = os.getloadavg(), time.perf_counter()
    configs = {f"{e} {v}": {"deploy": str(deploys[v]), "backend": "onnxruntime+openvino", "route_positions": 0,
                            "force": e, "threads": args.threads} for e in engines for v in VARIANTS}
    timed = time_apart(tmp, configs, shapes, rounds=args.rounds)
    for name, t in timed.items():  # each process ran the graph without prefix inputs, on its own engine
        engine = name.split()[0]
        assert t["graph_runs"] and all(g.split()[0] == "model_noprefix.onnx" and
                                       ("shape-specialised" in g) == (engine == "openvino") for g in t["graph_runs"]), t
    rows = {}
    for engine in engines:
        for i, (b, s) in enumerate(shapes):
            whole, pooled = (timed[f"{engine} {v}"]["rounds"][i] for v in VARIANTS)
            ratios = [w / q for w, q in zip(whole, pooled)]
            row = rows[f"{engine} {b}x{s}"] = {
                "whole_ms": round(1e3 * statistics.median(whole), 3),
                "pooled_ms": round(1e3 * statistics.median(pooled), 3),
                "speedup": round(statistics.median(whole) / statistics.median(pooled), 4),
                "speedup_per_round": [round(r, 4) for r in ratios]}
            print(f"{engine:12s} {b:3d} x {s:3d}: whole {row['whole_ms']:8.2f} ms, pooled {row['pooled_ms']:8.2f} ms, "
                  f"{row['speedup']:.3f}x (rounds {row['speedup_per_round']})", flush=True)
    print("largest output difference, pooled vs whole:", diffs)
    result = {"command": "python -m studies.pooled_row " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": describe(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "rounds": args.rounds,
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "timing_seconds": round(time.perf_counter() - started, 1), "pooled_nodes": nodes,
              "max_abs_diff_pooled_vs_whole": diffs, "rows": rows,
              "graph_runs": {name: t["graph_runs"] for name, t in timed.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
