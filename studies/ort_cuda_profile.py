"""Where an exact onnxruntime-cuda forward of a classifier deployment spends its time, by operator type: ONNX Runtime's
profiler (CUDA provider with TF32 off, as promptmux runs it) on the feeds Runtime.forward builds. For CUDA nodes the
profiler times each node's work on the host (its kernel launches, which are asynchronous), not the kernels on the
GPU: a forward whose node times add up to about its wall time is bound by launches, not by the GPU.

    python -m studies.ort_cuda_profile DEPLOY OUT.json [--batch 32] [--tokens 256] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import onnxruntime as ort

    from promptmux import Runtime
    from promptmux.runtime import sessions
    from studies.capture import node_times, session_calls

    p = argparse.ArgumentParser(prog="python -m studies.ort_cuda_profile", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    rt = Runtime(args.deploy, backend="onnxruntime-cuda")
    ids = np.random.default_rng(0).integers(1000, 20000, (args.batch, args.tokens))
    with session_calls(sessions.OrtBoundSession) as calls:
        rt.forward(ids, None, [rt.tasks[i % len(rt.tasks)] for i in range(args.batch)])
    session, feeds = calls[-1]
    assert len(rt.graph_runs) == 1, rt.graph_runs  # the one file the forward ran: profiled below
    graph = next(iter(rt.graph_runs))
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    s = ort.InferenceSession(str(Path(args.deploy) / graph), so,
                             providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
    f = {n: feeds[n] for n in session.input_names}
    for _ in range(5):
        s.run(None, f)
    t0 = time.perf_counter()
    for _ in range(args.runs):
        s.run(None, f)
    wall_ms = (time.perf_counter() - t0) / args.runs * 1e3
    total, count = node_times(s.end_profiling(), key=lambda args: (args["op_name"], args.get("provider", "?")))
    runs = 5 + args.runs
    result = {"command": "python -m studies.ort_cuda_profile " + " ".join(argv or sys.argv[1:]), "graph": graph,
              "batch": args.batch, "tokens": args.tokens, "wall_ms": wall_ms, "onnxruntime": ort.__version__,
              "ops": [{"op": op, "provider": prov, "ms": d / runs / 1e3, "per_run": count[(op, prov)] / runs}
                      for (op, prov), d in total.most_common()]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "ops"}))
    for r in result["ops"][:12]:
        print(f"{r['op']:28s} {r['provider']:24s} {r['ms']:8.3f} ms  x{r['per_run']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
