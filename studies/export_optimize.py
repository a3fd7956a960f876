"""Does the exporter's graph optimizer earn its time? Export with and without onnxscript's optimizer
(`torch.onnx.export(optimize=...)`, export/onnx_export.py ONNXSCRIPT_OPTIMIZER), then time both deployments.

    python -m studies.export_optimize minilm|smollm2 [--rounds 5] [--out results/export-optimize-X.json]

Each export and each timing runs in its own process; timings alternate between the two deployments, round by
round, and report medians. The graph each timing ran is asserted (Runtime.graph_runs), and the two deployments'
outputs are compared (classifier scores: max difference; generation: token equality).
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

EXPORT = r"""
import json, sys, time
from pathlib import Path
from promptmux.export import onnx_export
from promptmux.export.deploy import export_deployment
model, out, optimize = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
onnx_export.ONNXSCRIPT_OPTIMIZER = optimize
if model == "minilm":
    from promptmux.demo import ADAPTERS, TASKS, base_model_dir
else:
    from promptmux.demo.smollm2 import ADAPTERS, TASKS, smollm2_base_dir as base_model_dir
base = base_model_dir()
start = time.perf_counter()
export_deployment(base, {t: ADAPTERS / t for t in TASKS}, out, quiet=True)
took = time.perf_counter() - start
import onnx
nodes = {p.name: len(onnx.load(str(p), load_external_data=False).graph.node) for p in sorted(out.glob("*.onnx"))}
print(json.dumps({"export_s": round(took, 2), "nodes": nodes}))
"""

TIME = r"""
import json, sys, time
import numpy as np
from promptmux import Runtime
model, deploy, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rt = Runtime(deploy, backend="onnxruntime")
if model == "minilm":
    from promptmux.demo import EXAMPLES
    tasks, texts = zip(*(EXAMPLES * 4))  # B = 4 x the demo's examples
    call = lambda: rt.classify(list(texts), list(tasks))
    result = lambda out: [r["scores"] for r in out]
else:
    from promptmux.demo.smollm2 import TASKS, format_input
    texts = [format_input(t) for t in ("A warm, funny film.", "The bank raised rates.")] * 2
    tasks = [TASKS[i % len(TASKS)] for i in range(len(texts))]
    call = lambda: rt.generate(texts, tasks, max_new_tokens=16, eos_token_id=[])
    result = lambda out: [r["token_ids"] for r in out]
out = call()  # warm-up
rt.graph_runs.clear()
steps = {"decoder.onnx": 0}
if model != "minilm":  # decode steps run the decoder graph: count them as graph_runs counts full-sequence batches
    session, run = rt.generator.session, rt.generator.session.run_all
    def counted(*a, **k):
        steps["decoder.onnx"] += 1
        return run(*a, **k)
    session.run_all = counted
times = []
for _ in range(reps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
runs = {**dict(rt.graph_runs), **{k: v for k, v in steps.items() if v}}
print(json.dumps({"median_ms": round(1000 * sorted(times)[len(times) // 2], 2), "graph_runs": runs,
                  "result": result(out)}))
"""


def _run(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.export_optimize", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=["minilm", "smollm2"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20, help="timed calls per round")
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, help="where the two deployments go (reused if already exported there)")
    args = p.parse_args(argv)
    from promptmux.bench.machine import machine_info

    load_start = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-optimize-"))
    settings = {"optimized": True, "plain": False}
    exports = {}
    for name, flag in settings.items():  # each export's record kept beside it: --work DIR reuses them
        record = work / f"{name}.export.json"
        if not record.is_file():
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(_run(EXPORT, args.model, work / name, int(flag))))
        exports[name] = json.loads(record.read_text())
    times = {name: [] for name in settings}
    runs = {}
    for _ in range(args.rounds):
        for name in settings:
            r = _run(TIME, args.model, work / name, args.reps)
            times[name].append(r["median_ms"])
            runs[name] = r
    for name, r in runs.items():  # the deployment's own graphs ran, and nothing else
        assert r["graph_runs"] and set(r["graph_runs"]) <= set(exports[name]["nodes"]), (name, r["graph_runs"])
    a, b = runs["optimized"]["result"], runs["plain"]["result"]
    if args.model == "minilm":
        same = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    else:
        same = a == b
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "command": "python -m studies.export_optimize " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": machine_info(os.cpu_count() or 1), "date": time.strftime("%Y-%m-%d"),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "exports": exports, "median_ms_per_round": times, "median_ms": med,
        "plain_over_optimized_time": round(med["plain"] / med["optimized"], 3),
        "export_time_ratio": round(exports["optimized"]["export_s"] / exports["plain"]["export_s"], 3),
        "graph_runs": {n: r["graph_runs"] for n, r in runs.items()},
        ("max_score_difference" if args.model == "minilm" else "tokens_identical"): same,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    return result


if __name__ == "__main__":
    main()
