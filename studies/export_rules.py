"""Does leaving rewrite rules out of the exporter's optimizer (export/onnx_export.py SKIPPED_REWRITE_RULES) make the
export faster, and are the graphs the same? A demo exported with all of onnxscript's default rules and with the
skipped ones left out, each export in its own process, alternating, round by round.

    python -m studies.export_rules [minilm|smollm2] [--rounds 2] [--out results/export-rules-smollm2.json]

Graphs are compared node by node (operator, inputs, outputs, attributes) and by their initializers' bytes.
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
import hashlib, json, sys, time
from pathlib import Path
import onnx
from promptmux.export import onnx_export
from promptmux.export.deploy import export_deployment
model, out, skip = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
if not skip:
    onnx_export.SKIPPED_REWRITE_RULES = frozenset()
if model == "minilm":
    from promptmux.demo import ADAPTERS, TASKS, base_model_dir
    options = {}
else:
    from promptmux.demo.smollm2 import ADAPTERS, TASKS, smollm2_base_dir as base_model_dir
    options = {"generation_only": True}  # as `promptmux demo --model smollm2` exports it
base = base_model_dir()
start = time.perf_counter()
export_deployment(base, {t: ADAPTERS / t for t in TASKS}, out, quiet=True, **options)
took = time.perf_counter() - start
digests = {}
for p in sorted(out.glob("*.onnx")):
    m = onnx.load(str(p))  # weights included: the whole graph's bytes
    digests[p.name] = {"nodes": len(m.graph.node),
                       "sha256": hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()}
print(json.dumps({"export_s": round(took, 2), "graphs": digests}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.export_rules", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="smollm2", choices=["minilm", "smollm2"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from promptmux.bench.machine import machine_info
    from promptmux.export.onnx_export import SKIPPED_REWRITE_RULES

    env = machine_info(os.cpu_count() or 1)
    runs = {"all_rules": [], "skipped": []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            order = ["all_rules", "skipped"] if r % 2 == 0 else ["skipped", "all_rules"]
            for name in order:
                out = Path(work) / f"{name}-{r}"
                done = subprocess.run([sys.executable, "-c", EXPORT, args.model, str(out),
                                       "1" if name == "skipped" else "0"], capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"the export ({name}) failed:\n{done.stderr[-3000:]}")
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {k: statistics.median(x["export_s"] for x in v) for k, v in runs.items()}
    same = all(x["graphs"] == runs["all_rules"][0]["graphs"] for v in runs.values() for x in v)
    result = {"command": "python -m studies.export_rules " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": env, "load_average_end": list(os.getloadavg()),
              "model": args.model, "skipped_rules": sorted(SKIPPED_REWRITE_RULES), "median_export_s": median,
              "time_ratio_skipped_over_all": round(median["skipped"] / median["all_rules"], 3),
              "graphs_identical": same, "runs": runs}
    out = args.out or Path(f"results/export-rules-{args.model}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "runs")}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
