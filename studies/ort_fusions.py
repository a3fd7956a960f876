"""Does ONNX Runtime's SkipLayerNorm fusion pay on this CPU? The deployment's graph with and without it.

    python -m studies.ort_fusions out/minilm-demo [--batch-sizes 1,8,32] [--rounds 2] [--out FILE]

Each variant runs in a process of its own (no two thread pools in one process), variants alternating, a mixed
batch of the deployment's first two tasks at 64 tokens; median ms of the session call over 8-60 runs.
runtime/sessions.py disables the fusion on the CPU because of what this measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: `python -m studies.ort_fusions` runs from here


def _child(deploy: str, batch: int, disabled: bool, threads: int) -> float:
    import onnxruntime as ort

    from promptmux import Runtime
    from promptmux.core.archs import position_offset
    from promptmux.core.layout import build_layout

    rt = Runtime(deploy, backend="onnxruntime", threads=threads)
    ids = np.random.default_rng(0).integers(1000, 20000, size=(batch, 64))
    views = [rt.bank.view(rt.tasks[i % min(2, len(rt.tasks))]) for i in range(batch)]
    feeds = build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, np.ones_like(ids), None,
                         views, rt.dims).feeds
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(Path(deploy) / "model.onnx"), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["SkipLayerNormFusion"] if disabled else [])
    f = {i.name: feeds[i.name] for i in s.get_inputs()}
    for _ in range(3):
        s.run(None, f)
    times = []
    for _ in range(max(8, 60 // batch)):
        t = time.perf_counter()
        s.run(None, f)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m studies.ort_fusions", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)  # batch,disabled
    args = p.parse_args(argv)
    if args.child:
        batch, disabled = args.child.split(",")
        print(_child(args.deploy, int(batch), disabled == "1", args.threads))
        return []
    rows = []
    for r in range(args.rounds):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for disabled in ("0", "1"):
                done = subprocess.run([sys.executable, "-m", "studies.ort_fusions", str(Path(args.deploy).resolve()), "--threads",
                                       str(args.threads), "--child", f"{batch},{disabled}"],
                                      capture_output=True, text=True, check=True, cwd=ROOT)
                ms = float(done.stdout.strip().splitlines()[-1])
                rows.append({"round": r + 1, "batch_size": batch, "skip_layer_norm_fusion": disabled == "0", "ms": ms})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from promptmux.bench.machine import machine_info

        Path(args.out).write_text(json.dumps({"command": "python -m studies.ort_fusions " + " ".join(
            argv if argv is not None else sys.argv[1:]), "machine": machine_info(args.threads), "rows": rows},
            indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
