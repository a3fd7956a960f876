"""similar_tasks(top_k=5) over N tasks: seconds per query, on a copy of a deployment grown to N tasks.

    python studies/retrieval_scale.py DEPLOY --tasks 1000000

The store is grown as bench/many_tasks.py grows it (one task cloned with noise), then a fresh process opens it
and asks for the 5 tasks most similar to one of them, 3 times per method (the first read comes from the page cache
as the second does: the store was just written). Prints JSON with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QUERY = r"""
import json, sys, time
from promptmux.library.retrieval import similar_tasks
out = {}
for method in ("avg-cosine", "per-token-cosine"):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        rows = similar_tasks(sys.argv[1], "user-123", top_k=5, method=method)
        times.append(round(time.perf_counter() - t, 3))
    out[method] = {"seconds": times, "top": [r["task"] for r in rows]}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("deploy")
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    args = ap.parse_args()
    from promptmux.bench.many_tasks import build
    from promptmux.runtime.cpu import describe

    work = Path(tempfile.mkdtemp(prefix="promptmux-retrieval-", dir=args.workdir))
    try:
        result = {"machine": describe(), "load_average_start": os.getloadavg(), "tasks": args.tasks,
                  "build": build(Path(args.deploy), work / "deploy", args.tasks)}
        proc = subprocess.run([sys.executable, "-c", QUERY, str(work / "deploy")], capture_output=True, text=True,
                              check=True)
        result["queries"] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
