"""Does ONNX Runtime's CUDA provider keep the exact contract (1e-4 of PEFT)? A deployment's mixed batches through
Runtime(backend="onnxruntime-cuda") against the CPU session (itself within ~1e-6 of PEFT), and the same graph and feeds
on the CUDA provider with TF32 on (ONNX Runtime's default) and off.

    python -m studies.gpu_exactness DEPLOY OUT.json        # on a GPU machine with onnxruntime-gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import onnxruntime as ort

    from promptmux import Runtime
    from promptmux.runtime import sessions
    from studies.capture import session_calls

    deploy, out = (argv or sys.argv[1:])[:2]
    cpu = Runtime(deploy, backend="onnxruntime")
    gpu = Runtime(deploy, backend="onnxruntime-cuda")
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 8, 32):
        ids = rng.integers(1000, 20000, (batch, 64))
        tasks = [cpu.tasks[i % len(cpu.tasks)] for i in range(batch)]
        with session_calls(sessions.OrtSession) as calls:
            want = cpu.forward(ids, None, tasks)
        got = gpu.forward(ids, None, tasks)
        row = {"batch": batch, "runtime_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(want, got))}
        session, feeds = calls[-1]
        feeds = {n: feeds[n] for n in session.input_names}
        ref = session.session.run([session.output_name], feeds)[0]
        for tf32 in (1, 0):
            try:
                s = ort.InferenceSession(str(Path(deploy) / session.graph_file),
                                         providers=[("CUDAExecutionProvider", {"use_tf32": tf32})])
                assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
                row[f"raw_tf32_{tf32}_max_abs_diff"] = float(np.abs(s.run([session.output_name], feeds)[0] - ref).max())
            except Exception as e:  # an option this ONNX Runtime does not know: say so
                row[f"raw_tf32_{tf32}_error"] = str(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"command": "python -m studies.gpu_exactness " + " ".join(argv or sys.argv[1:]),
              "onnxruntime": ort.__version__, "graph_runs_gpu": dict(gpu.graph_runs), "rows": rows}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
