"""similar_tasks(top_k=5) over N tasks: seconds per query, on a copy of a deployment grown to N tasks.

    python studies/retrieval_scale.py DEPLOY --tasks 1000000

The store is grown as bench/many_tasks.py grows it (one task cloned with noise), then a fresh process opens it
and asks for the 5 tasks most similar to one of them, 3 times per method: its first query builds retrieval's index
(core/vector_index.py) from the store and writes its snapshot. A second fresh process asks the same, ranking from
the snapshot; then 1,000 tasks are added and 1,000 removed through another bank, and it asks again (catching up
with the changes). Prints JSON with the machine and the load average.
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
from promptmux.library.retrieval import load_bank, similar_tasks
bank = load_bank(sys.argv[1])[0]

def ask():
    out = {}
    for method in ("avg-cosine", "per-token-cosine"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            rows = similar_tasks(bank, "user-123", top_k=5, method=method)
            times.append(round(time.perf_counter() - t, 3))
        out[method] = {"seconds": times, "top": [r["task"] for r in rows]}
    return out

out = {"queries": ask()}
if len(sys.argv) > 2:  # 1,000 adds and 1,000 removals by another bank, then the same queries
    from promptmux.core.bank import PromptBank
    from promptmux.core.task import Task
    other = PromptBank.load(sys.argv[1], bank.spec)
    s = other.view("user-0")
    t = time.perf_counter()
    other.add([Task(f"late-{i}", s.kind, s.peft_type, s.num_virtual_tokens, {"prompt": s.tensors["prompt"] + i},
                    head=s.head, labels=s.labels) for i in range(1000)])
    for i in range(2000, 3000):
        other.remove(f"user-{i}")
    out["changes_seconds"] = round(time.perf_counter() - t, 2)
    out["after_2000_changes"] = ask()
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
        for key, extra in (("first_process", []), ("second_process", ["--changes"])):
            proc = subprocess.run([sys.executable, "-c", QUERY, str(work / "deploy"), *extra], capture_output=True,
                                  text=True, check=True)
            result[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
