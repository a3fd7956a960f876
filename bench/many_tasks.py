"""Many tasks in one deployment: what opening, serving and changing cost with N tasks against 2.

    python -m promptmux.bench.many_tasks DEPLOY --tasks 100000,1000000 [--out results/many-tasks.json]
    (promptmux bench DEPLOY --many-tasks 100000 runs the same)

For each N, a copy of DEPLOY (graphs linked) gets N synthetic tasks cloned from one of its prompt-tuning tasks with
a little noise (the issue's workload), written to its store in transactions of 10,000. Then each deployment is
measured in a fresh process, the 2-task deployment and the N-task one alternating for --rounds rounds:
- open: Runtime() time and the process's RSS after it, and open + the first batch (which makes the session);
- classify: mixed batches of --batch rows, each row's task drawn from Zipf(1.0) over the tasks (S-LoRA's
  workloads), latency p50 / p99 and rows/s, after a warm-up; the graph that ran is checked (graph_runs);
- cold miss: one batch whose rows are all tasks never read before, against the same batch again (hot);
- add / remove under load: while a thread classifies, another process's worth of changes (persisted add and
  remove of a task, each one transaction) timed p50 / p99;
- RSS at the end, and bytes on disk.
Medians over rounds, ratios N : 2, the load average at start and end, and the machine are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .workload import zipf_ranks

CHUNK = 10_000  # tasks per transaction while the store is filled


def _pct(xs, q) -> float:
    return round(float(np.percentile(xs, q)) * 1e3, 3)


def build(src: Path, dest: Path, n: int, seed: int = 0) -> dict:
    """dest: src's files (graphs linked) and a store of src's tasks plus synthetic ones up to n in all."""
    from promptmux.core.bank import STORE_FILE
    from promptmux.core.folder import read_bank
    from promptmux.core.task import Task

    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith(STORE_FILE) or f.name.startswith(".") or f.name == "retrieval":  # derived from the store
            continue
        if f.suffix in (".onnx", ".data", ".xml", ".bin") or f.name.endswith(".onnx.data") or f.is_dir():
            (dest / f.name).symlink_to(f.resolve())
        else:
            shutil.copy2(f, dest / f.name)
    shutil.copy2(src / STORE_FILE, dest / STORE_FILE)
    bank = read_bank(dest)
    start = time.perf_counter()
    source = next(bank.view(name) for name in bank.names() if set(bank.view(name).tensors) == {"prompt"})
    rng = np.random.default_rng(seed)
    scale = 0.01 * float(source.tensors["prompt"].std())
    made, k = len(bank), 0
    while made < n:
        count = min(CHUNK, n - made)
        noise = rng.standard_normal((count, *source.tensors["prompt"].shape), dtype=np.float32) * scale
        bank.add([Task(f"user-{k + i}", source.kind, source.peft_type, source.num_virtual_tokens,
                       {"prompt": source.tensors["prompt"] + noise[i]}, head=source.head, labels=source.labels)
                  for i in range(count)])
        made, k = made + count, k + count
    bank.close()
    return {"tasks": n, "source_task": source.name, "build_seconds": round(time.perf_counter() - start, 1)}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(deploy: Path, batch: int, seq: int, requests: int, changes: int, threads: int | None, seed: int) -> dict:
    """In this (fresh) process: the numbers of one deployment."""
    from promptmux import Runtime
    from promptmux.core.folder import read_bank
    from promptmux.core.task import Task

    before = rss_mb()
    t = time.perf_counter()
    rt = Runtime(deploy, backend="onnxruntime", threads=threads)
    out = {"open_s": round(time.perf_counter() - t, 3), "rss_after_open_mb": round(rss_mb(), 1),
           "rss_before_open_mb": round(before, 1)}
    n = len(rt.bank)
    rng = np.random.default_rng(seed)
    real = rt.bank.page(n if n <= 16 else 16)[0]
    real = [t for t in real if not t.startswith("user-")]

    def task_at(rank: int) -> str:  # rank 0 = the most popular: the deployment's own tasks, then user-0, user-1, ...
        return real[rank] if rank < len(real) else f"user-{rank - len(real)}"

    ranks = zipf_ranks(rng, n, (requests + 20, batch))
    ids = rng.integers(1000, 20000, size=(batch, seq))
    mask = np.ones_like(ids)
    rows = [[task_at(int(r)) for r in row] for row in ranks]  # names looked up before timing
    t = time.perf_counter()
    rt.forward(ids, mask, rows[0])  # the first request also makes the graph's session (made on first use)
    out["open_and_first_batch_s"] = round(out["open_s"] + time.perf_counter() - t, 3)
    for row in rows[1:20]:  # warm-up: the hottest tasks read
        rt.forward(ids, mask, row)
    lat = []
    for row in rows[20:]:
        t = time.perf_counter()
        rt.forward(ids, mask, row)
        lat.append(time.perf_counter() - t)
    assert sum(rt.graph_runs.values()) == requests + 20, dict(rt.graph_runs)  # every batch ran one graph
    out["graph_runs"] = dict(rt.graph_runs)
    out.update(classify_p50_ms=_pct(lat, 50), classify_p99_ms=_pct(lat, 99),
               rows_per_s=round(batch * len(lat) / sum(lat), 1))
    # Cold: tasks never read in this process, then the same batch hot.
    cold_rows = [task_at(n - 1 - i) for i in range(batch)] if n > batch * 4 else rows[-1]
    hits = rt.bank.stats["misses"]
    t = time.perf_counter()
    rt.forward(ids, mask, cold_rows)
    cold = time.perf_counter() - t
    misses = rt.bank.stats["misses"] - hits
    hot = min(_timed(lambda: rt.forward(ids, mask, cold_rows)) for _ in range(5))
    out.update(cold_batch_ms=round(cold * 1e3, 3), hot_batch_ms=round(hot * 1e3, 3), cold_rows_read=misses,
               cold_miss_extra_ms_per_row=round((cold - hot) * 1e3 / max(1, misses), 3))
    # Changes under load: a thread classifies while this one adds and removes (each a persisted transaction).
    writer = read_bank(deploy)
    template = rt.bank.view(task_at(0))
    stop, served, errors = threading.Event(), [0], []

    def load():
        while not stop.is_set():
            try:
                rt.forward(ids, mask, rows[served[0] % len(rows)])
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - counted: the benchmark reports failures
                errors.append(repr(e))

    th = threading.Thread(target=load)
    th.start()
    adds, removes = [], []
    try:
        for i in range(changes):
            task = Task(f"bench-change-{os.getpid()}-{i}", template.kind, template.peft_type,
                        template.num_virtual_tokens, dict(template.tensors), head=template.head, labels=template.labels)
            adds.append(_timed(lambda t=task: writer.add([t])))
            removes.append(_timed(lambda t=task: writer.remove(t.name)))
            time.sleep(0.02)  # spread over the load: about one change per classified batch
    finally:
        stop.set()
        th.join()
    out.update(add_p50_ms=_pct(adds, 50), add_p99_ms=_pct(adds, 99), remove_p50_ms=_pct(removes, 50),
               remove_p99_ms=_pct(removes, 99), batches_during_changes=served[0], failures=len(errors),
               rss_end_mb=round(rss_mb(), 1), bank_cache_mb=round(rt.bank.cache_used() / 2**20, 1),
               tasks=n, store_bytes=rt.bank.size_bytes())
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(deploy: Path, counts: list[int], rounds: int = 3, batch: int = 8, seq: int = 64, requests: int = 200,
        changes: int = 200, threads: int | None = None, workdir: Path | None = None, keep: bool = False) -> dict:
    from promptmux.runtime.cpu import describe

    work = Path(tempfile.mkdtemp(prefix="promptmux-many-", dir=workdir))
    result = {"machine": describe(), "load_average_start": os.getloadavg(), "deployment": str(deploy),
              "batch": batch, "seq": seq, "requests": requests, "changes": changes, "rounds": rounds, "sizes": {}}
    try:
        folders = {2: work / "n2"}
        builds = {2: build(deploy, folders[2], 2)}
        for n in counts:
            folders[n] = work / f"n{n}"
            builds[n] = build(deploy, folders[n], n)
            print(json.dumps({"built": builds[n]}), file=sys.stderr, flush=True)
        samples: dict[int, list[dict]] = {n: [] for n in folders}
        for r in range(rounds):
            for n in folders:  # alternating: each size once per round, each in a fresh process
                proc = subprocess.run([sys.executable, "-m", "promptmux.bench.many_tasks", "--child", str(folders[n]),
                                       json.dumps(dict(batch=batch, seq=seq, requests=requests, changes=changes,
                                                       threads=threads, seed=r))],
                                      capture_output=True, text=True, check=True)
                samples[n].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps({"round": r, "tasks": n, **samples[n][-1]}), file=sys.stderr, flush=True)
        for n, runs in samples.items():
            med = {k: statistics.median(s[k] for s in runs) for k in runs[0]
                   if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)}
            result["sizes"][n] = {"build": builds[n], "median": med, "rounds": runs}
        base = result["sizes"][2]["median"]
        for n in counts:
            med = result["sizes"][n]["median"]
            result["sizes"][n]["vs_2_tasks"] = {k: round(med[k] / base[k], 3) for k in (
                "open_s", "open_and_first_batch_s", "rss_after_open_mb", "classify_p50_ms", "classify_p99_ms",
                "rows_per_s", "add_p99_ms", "remove_p99_ms") if base.get(k)}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("deploy", nargs="?")
    ap.add_argument("--tasks", default="100000", help="comma-separated task counts, each measured against 2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--workdir", help="where the N-task copies are written (default: the temp folder)")
    ap.add_argument("--out", help="write the result as JSON")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), **json.loads(args.child[1]))))
        return 0
    if not args.deploy:
        ap.error("give a deployment folder")
    result = run(Path(args.deploy), [int(x) for x in args.tasks.split(",")], args.rounds, args.batch, args.seq,
                 args.requests, args.changes, args.threads, Path(args.workdir) if args.workdir else None)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
