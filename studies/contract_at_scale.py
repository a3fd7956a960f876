"""The precision contract on a large bank: how long a deployment of many tasks takes to open at a non-exact
precision, the first time (the contract measured) and the next (the contract read back), and what the contract
covers (runtime/precision.py: contract_tasks, covers).

    python -m studies.contract_at_scale DEMO_DEPLOY [--tasks 5000] [--precision int8] [--threads 2] [--out FILE.json]

The bank: the demo's tasks and noisy copies of its prompt tasks up to --tasks (bench/many_tasks.build), in a
temporary folder, the graphs copied (ONNX Runtime's quantizer refuses weights behind a symbolic link). The contract
is measured on generated inputs (no calibration file in the copy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy", type=Path)
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--precision", default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.many_tasks import build
    from promptmux.bench.measure import load_average
    from promptmux.runtime import cpu
    from promptmux.runtime.precision import record_key

    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="contract-at-scale-"))
    try:
        deploy = work / "deploy"
        built = build(args.deploy, deploy, args.tasks)
        for link in [f for f in deploy.iterdir() if f.is_symlink()]:
            target = link.resolve()
            link.unlink()
            (shutil.copytree if target.is_dir() else shutil.copy2)(target, link)
        opens = []
        for _ in range(2):
            t = time.perf_counter()
            rt = Runtime(deploy, backend="onnxruntime", precision=args.precision, threads=args.threads)
            opens.append(round(time.perf_counter() - t, 2))
        entry = json.loads((deploy / "manifest.json").read_text())["precision"][record_key(rt.backend, rt.precision)]
        result = {
            "command": "python -m studies.contract_at_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu.describe(),
            "threads": args.threads, "load_average_start": load_start, "bank": built,
            "first_open_seconds": opens[0], "second_open_seconds": opens[1],
            "contract": {"tasks_measured": entry["tasks_measured"], "tasks_in_bank": entry["tasks_in_bank"],
                         "tasks_fingerprinted": len(entry["digests"]), "seconds": entry["seconds"],
                         "passed": entry["passed"],
                         "accuracy_control_seconds": (entry.get("accuracy_control") or {}).get("seconds")},
            "manifest_bytes": (deploy / "manifest.json").stat().st_size, "load_average_end": load_average()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
