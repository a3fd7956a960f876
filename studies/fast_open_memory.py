"""How much memory a process keeps after a non-exact precision's first open measured its contract (and, for
`precision="fast"`, every candidate's contract and timing).

    python -m studies.fast_open_memory DEPLOY [--precision fast|bf16|int8] [--backend auto|openvino|onnxruntime]
                                              [--threads 2] [--out results/....json]

DEPLOY: a classifier deployment (the demo's). It is copied to a temporary folder with its recorded contracts and
fast choice removed, so the copy measures as a first open does (the graphs already made are kept, so nothing is
quantized again). Reported: the seconds the open took; the process's resident memory after it, after Python's
cycle collector (gc.collect) and after glibc's malloc_trim; after serving the benchmarks' shapes (1, 8 and 32 x 64
tokens, 8 x 256; three batches each); its peak. Memory the collector frees was held by objects in reference
cycles (a runtime opened for a candidate and dropped). Memory a runtime keeps after its open beyond what serving
needs was grown by the contract's calibration batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.fast_open_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("deploy", type=Path, help="a classifier deployment (promptmux demo --out DIR)")
    ap.add_argument("--precision", default="fast", choices=("fast", "bf16", "int8"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args(argv)

    import ctypes
    import gc
    import resource
    import shutil

    import numpy as np

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "deploy"
        shutil.copytree(args.deploy, deploy)
        manifest = json.loads((deploy / "manifest.json").read_text())
        manifest["precision"] = {}
        manifest.pop("fast", None)
        (deploy / "manifest.json").write_text(json.dumps(manifest, indent=1))
        before = resident_mb()
        started = time.perf_counter()
        rt = Runtime(deploy, precision=args.precision, backend=args.backend, threads=args.threads)
        seconds = time.perf_counter() - started
        result = {"command": "python -m studies.fast_open_memory " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
                  "machine": machine_info(args.threads), "open_seconds": round(seconds, 1),
                  "chosen": f"{rt.backend}/{rt.precision}", "rss_mb_before_open": round(before),
                  "rss_mb_after_open": round(resident_mb())}
        result["collected_objects"] = gc.collect()
        result["rss_mb_after_gc_collect"] = round(resident_mb())
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        result["rss_mb_after_malloc_trim"] = round(resident_mb())
        rng = np.random.default_rng(0)
        for rows, tokens in ((1, 64), (8, 64), (32, 64), (8, 256)):
            ids = rng.integers(1000, 20000, (rows, tokens))
            for _ in range(3):
                rt.forward(ids, np.ones_like(ids), [rt.tasks[0]] * rows)
        result["rss_mb_after_serving"] = round(resident_mb())
        result["graph_runs"] = dict(rt.graph_runs)  # which graphs the contract and the serving ran
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        del rt
    print(json.dumps({k: v for k, v in result.items() if k not in ("command", "machine")}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
