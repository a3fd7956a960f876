"""What this machine can do at most: fp32 and bf16 matrix-multiply rates and memory bandwidth.

    python -m studies.machine_limits [--threads N] [--out results/machine-limits.json]

Every benchmark row is then read as a fraction of the limit that bounds it: a classifier's forward is matrix
work (FLOPs / s against the GEMM rate of its precision), a decoding step reads every weight once (bytes / s
against the copy bandwidth). The GEMMs are PyTorch's (oneDNN: AVX-512 for fp32, AMX for bf16 where the CPU has
it), square 2048 x 2048 (large enough to run at the kernel's peak, small enough to stay in a few MB of cache
per panel); the bandwidth is a numpy copy of 512 MiB, counting the bytes read and written.
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
    limits = {
        "fp32_gemm_gflops": round(gemm_flops("float32") / 1e9, 1),
        "bf16_gemm_gflops": round(gemm_flops("bfloat16") / 1e9, 1),
        "copy_gb_per_s": round(copy_bandwidth() / 1e9, 2),
    }
    from promptmux.bench.machine import machine_info

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
