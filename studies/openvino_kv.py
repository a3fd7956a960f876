"""Decoding on OpenVINO with and without the per-step copy of the KV cache out of the infer request.

Two runtimes over the same deployment in one process, timed in alternating rounds: "copy" copies every output
out of the request's memory (what runtime/openvino_session.py did before), "handover" lets OpenVINO write the
presents and logits into arrays the generator then owns (what it does now). Greedy tokens must be identical.

    python -m studies.openvino_kv [DEPLOY] [--precision fp32|bf16] [--batch 8] [--prompt 64] [--new 32]
        [--rounds 5] [--out results/openvino-kv-handover-PRECISION.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy", nargs="?", default="out/smollm2-demo")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from promptmux.runtime.runtime import Runtime

    load = [os.getloadavg()[0]]
    runtimes = {mode: Runtime(args.deploy, backend="openvino", precision=args.precision)
                for mode in ("copy", "handover")}
    session = runtimes["copy"].generator.session
    session._past_of = {}  # no arrays handed to OpenVINO: every output is copied out
    session._local = threading.local()  # a request that never had arrays set
    tasks = runtimes["copy"].tasks
    ids = np.random.default_rng(0).integers(100, 20000, (args.batch, args.prompt))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    row_tasks = [tasks[i % len(tasks)] for i in range(args.batch)]
    seconds = {mode: [] for mode in runtimes}
    tokens = {}
    for _ in range(args.rounds):
        for mode, rt in runtimes.items():
            t0 = time.perf_counter()
            out = rt.generate(inputs, row_tasks, max_new_tokens=args.new, eos_token_id=[])
            seconds[mode].append(time.perf_counter() - t0)
            tokens[mode] = [r["token_ids"] for r in out]
    load.append(os.getloadavg()[0])
    med = {mode: statistics.median(v) for mode, v in seconds.items()}
    result = {"command": "python -m studies.openvino_kv " + " ".join(argv or sys.argv[1:]),
              "deployment": args.deploy, "precision": args.precision, "batch": args.batch, "prompt": args.prompt,
              "new_tokens": args.new, "median_s": med,
              "tokens_per_s": {m: args.batch * args.new / s for m, s in med.items()},
              "speedup_handover": med["copy"] / med["handover"], "same_tokens": tokens["copy"] == tokens["handover"],
              "load_avg_start_end": load}
    out = args.out or Path(f"results/openvino-kv-handover-{args.precision}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
