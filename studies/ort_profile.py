"""Where an exact ONNX Runtime forward of a classifier deployment spends its time, by operator type, and what
rate its matrix multiplications reach (to read against studies.machine_limits' fp32 GEMM rate).

The batch is a mixed batch of the deployment's first two tasks, run through Runtime.forward once to get the feeds
the engine sees, then profiled on ONNX Runtime with promptmux's session options.

    python -m studies.ort_profile [DEPLOY] [--batch 8] [--tokens 64] [--threads 2] [--runs 20] [--precision int8]
        [--out results/ort-profile-minilm-b8.json]

--precision int8 profiles the int8 graph the deployment's contract chose (its MatMuls are then MatMulInteger or
the fused DynamicQuantizeMatMul / MatMulIntegerToFloat, read against the int8 GEMM limit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from studies.capture import node_times, session_calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy", nargs="?", default="out/minilm-demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import onnxruntime as ort

    from promptmux.runtime import sessions
    from promptmux.runtime.runtime import Runtime

    rt = Runtime(args.deploy, backend="onnxruntime", precision=args.precision, threads=args.threads)
    with session_calls(sessions.OrtSession) as calls:
        ids = np.random.default_rng(0).integers(1000, 20000, (args.batch, args.tokens))
        rt.forward(ids, None, [rt.tasks[i % 2] for i in range(args.batch)])
    session, feeds = calls[-1]
    # The file the forward ran, as the Runtime counted it: matching graphs by their inputs picked an int8 copy
    # (model_noprefix.int8.onnx, same inputs, sorted first) in a deployment that `--precision fast` had quantized.
    assert list(rt.graph_runs) == [session.graph_file], (rt.graph_runs, session.graph_file)
    graph = Path(args.deploy) / session.graph_file
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.enable_profiling = True
    tmp = tempfile.mkdtemp()
    so.profile_file_prefix = str(Path(tmp) / "ort")
    s = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=sessions.CPU_DISABLED_OPTIMIZERS)
    f = {n: feeds[n] for n in session.input_names}
    warm = 5
    for _ in range(warm):
        s.run(None, f)
    t0 = time.perf_counter()
    for _ in range(args.runs):
        s.run(None, f)
    wall_ms = (time.perf_counter() - t0) / args.runs * 1e3
    total, count = node_times(s.end_profiling())
    runs = warm + args.runs
    kernel_ms = sum(total.values()) / runs / 1e3
    # Linear layers of a BERT-style encoder: 4 h^2 (attention projections) + 2 h i (feed-forward) per position.
    c = rt.config
    positions = int(np.prod(feeds["attention_mask"].shape))
    linear_gflop = 2 * positions * c.num_hidden_layers * (4 * c.hidden_size ** 2
                                                          + 2 * c.hidden_size * c.intermediate_size) / 1e9
    matmuls = ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    matmul_ms = sum(total.get(op, 0) for op in matmuls) / runs / 1e3
    result = {"command": "python -m studies.ort_profile " + " ".join(argv or sys.argv[1:]), "graph": graph.name,
              "batch": args.batch, "tokens": args.tokens, "positions": positions, "wall_ms": wall_ms,
              "kernel_ms": kernel_ms, "linear_gflop": linear_gflop,
              "precision": args.precision, "matmul_gflops": linear_gflop / (matmul_ms / 1e3) if matmul_ms else None,
              "ops": {op: {"ms": d / runs / 1e3, "share": d / sum(total.values()), "per_run": count[op] / runs}
                      for op, d in total.most_common()},
              "load_avg": os.getloadavg()[0]}
    out = args.out or Path(f"results/ort-profile-{Path(args.deploy).name}-b{args.batch}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "ops"}))
    for op, r in list(result["ops"].items())[:8]:
        print(f"{op:22s} {r['ms']:7.2f} ms {100 * r['share']:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
