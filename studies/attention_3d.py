"""Attention on 3-D projections (export/attention_3d.py) against the exporter's 4-D form with its head transposes:
the demo exported both ways (each export in a process of its own), then each (variant, engine, shape) timed through
Runtime.forward in a process of its own, variants alternating round by round; medians. Each worker asserts which
graph ran (graph_runs) and which form of Attention that graph holds, and the outputs of the two variants are
compared.

    python -m studies.attention_3d [--engines onnxruntime,openvino] [--shapes 1x64,8x64,32x64] [--rounds 3]
        [--runs 30] [--threads 2] [--out results/attention-3d.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = ("4d", "3d")

EXPORT = r"""
import sys
from pathlib import Path
from promptmux.export import onnx_export
from promptmux.export.deploy import export_deployment
from promptmux.demo import ADAPTERS, TASKS, base_model_dir
if sys.argv[2] == "4d":
    onnx_export.EXTRA_REWRITE_RULES = ()
export_deployment(base_model_dir(), {t: ADAPTERS / t for t in TASKS}, Path(sys.argv[1]), quiet=True)
"""


def attention_forms(graph: Path) -> set[str]:
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return {"3d" if any(a.name == "q_num_heads" for a in n.attribute) else "4d" for n in nodes
            if n.op_type == "Attention"}


def worker(deploy: str, variant: str, engine: str, batch: int, tokens: int, runs: int, threads: int) -> dict:
    from promptmux import Runtime
    from studies.openvino_static_shapes import steady_forwards

    rt = Runtime(deploy, backend=engine, threads=threads)
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, tokens))
    mask = np.ones_like(ids)
    tasks = [rt.tasks[i % len(rt.tasks)] for i in range(batch)]
    out, times, ran = steady_forwards(rt, ids, mask, tasks, runs)  # OpenVINO's model for this shape made first
    assert sum(ran.values()) == runs and all(g.split()[0] == "model_noprefix.onnx" for g in ran), ran
    assert attention_forms(Path(deploy) / "model_noprefix.onnx") == {variant}, variant
    return {"ms": 1e3 * float(np.median(times)), "graph_runs": ran,
            "outputs": [o.tolist() for o in out]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="onnxruntime,openvino")
    p.add_argument("--shapes", default="1x64,8x64,32x64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/attention-3d.json"))
    p.add_argument("--worker", nargs=5, metavar=("DEPLOY", "VARIANT", "ENGINE", "BATCH", "TOKENS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        deploy, variant, engine, batch, tokens = args.worker
        print(json.dumps(worker(deploy, variant, engine, int(batch), int(tokens), args.runs, args.threads)))
        return 0
    from promptmux.runtime.cpu import describe

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    engines = args.engines.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="attention-3d-"))
    deploys = {v: tmp / v for v in VARIANTS}
    for v, d in deploys.items():
        subprocess.run([sys.executable, "-c", EXPORT, str(d), v], check=True)
        assert attention_forms(d / "model_noprefix.onnx") == {v}, f"the {v} export holds other Attention forms"
    load_start = os.getloadavg()
    times: dict = {}
    max_diff: dict = {}
    for r in range(args.rounds):
        for engine in engines:
            for b, s in shapes:
                outs = {}
                for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    cmd = [sys.executable, "-m", "studies.attention_3d", "--runs", str(args.runs), "--threads",
                           str(args.threads), "--worker", str(deploys[v]), v, engine, str(b), str(s)]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode:
                        raise RuntimeError(done.stderr[-3000:])
                    got = json.loads(done.stdout.strip().splitlines()[-1])
                    times.setdefault(f"{engine} {b}x{s}", {}).setdefault(v, []).append(got["ms"])
                    outs[v] = got["outputs"]
                diff = max(float(np.abs(np.array(a) - np.array(c)).max()) for a, c in zip(outs["4d"], outs["3d"]))
                key = f"{engine} {b}x{s}"
                max_diff[key] = max(max_diff.get(key, 0.0), diff)
                print(f"round {r + 1} {key}: " + ", ".join(f"{v} {times[key][v][-1]:.2f} ms" for v in VARIANTS),
                      flush=True)
    rows = {k: {"4d_ms": statistics.median(t["4d"]), "3d_ms": statistics.median(t["3d"]),
                "speedup_3d": statistics.median(t["4d"]) / statistics.median(t["3d"]),
                "max_abs_diff_3d_vs_4d": max_diff[k], "rounds": t} for k, t in times.items()}
    for k, row in rows.items():
        print(f"{k:22s} 4-D {row['4d_ms']:8.2f} ms  3-D {row['3d_ms']:8.2f} ms  {row['speedup_3d']:.3f}x  "
              f"max diff {row['max_abs_diff_3d_vs_4d']:.1e}")
    result = {"command": "python -m studies.attention_3d " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": describe(), "threads": args.threads, "runs": args.runs, "load_avg_start": load_start,
              "load_avg_end": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
