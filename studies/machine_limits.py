"""What this machine can do at most: fp32, bf16 and int8 matrix-multiply rates and memory bandwidth.

    python -m studies.machine_limits [--threads N] [--out results/machine-limits.json]

Every benchmark row is then read as a fraction of the limit that bounds it: a classifier's forward is matrix
work (FLOPs / s against the GEMM rate of its precision), a decoding step reads every weight once (bytes / s
against the copy bandwidth). The fp32 and bf16 GEMMs are PyTorch's (oneDNN: AVX-512 for fp32, AMX for bf16 where
the CPU has it); bf16 only where the CPU computes it (AMX or AVX512-BF16): elsewhere PyTorch emulates it, which
took over 5 minutes on an AMD Zen 3 and bounds nothing promptmux runs there. The int8 GEMM is ONNX Runtime's
MatMulInteger (uint8 x int8, MLAS: what int8 classifiers run; AMX, VNNI or AVX2's multiply-adds, whichever the
CPU has). All square 2048 x 2048 (large enough to run at the kernel's peak, small enough to stay in a few MB of
cache per panel); the bandwidth is a numpy copy of 512 MiB, counting the bytes read and written.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_flops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in this dtype (best of repeats)."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    with torch.inference_mode():
        seconds = _best_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / seconds


def int8_gemm_ops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Integer multiply-adds x 2 per second of ONNX Runtime's MatMulInteger, uint8 [n, n] x int8 [n, n] -> int32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    seconds = _best_seconds(lambda: session.run(None, {"a": a}), repeats)
    return 2 * n**3 / seconds


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large array copy (read + write)."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    seconds = _best_seconds(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / seconds


def measure(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    from promptmux.bench.machine import machine_info
    from promptmux.runtime.cpu import cpu_flags

    flags = cpu_flags() or {}
    native_bf16 = flags.get("amx_bf16") or flags.get("avx512_bf16")
    limits = {
        "fp32_gemm_gflops": round(gemm_flops("float32") / 1e9, 1),
        # None: the CPU has no bf16 (see the docstring)
        "bf16_gemm_gflops": round(gemm_flops("bfloat16") / 1e9, 1) if native_bf16 else None,
        "int8_gemm_gops": round(int8_gemm_ops(threads) / 1e9, 1),
        "copy_gb_per_s": round(copy_bandwidth() / 1e9, 2),
    }

    return {"limits": limits, "threads": threads, "machine": machine_info(threads), "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "method": __doc__.strip().split("\n\n")[-1].replace("\n", " ")}


def load(path: str | Path = Path(__file__).resolve().parents[1] / "results" / "machine-limits.json") -> dict:
    return json.loads(Path(path).read_text())["limits"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.machine_limits", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    result = measure(args.threads)
    print(json.dumps(result["limits"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
