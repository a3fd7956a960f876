"""Which embedded store holds the prompt bank: SQLite in WAL mode (standard library) or LMDB (`lmdb`, memory-mapped).

The workload of issue 24, one process per store (python studies/bank_store.py --tasks 100000):
- bulk load N demo-sized records (one MiniLM prompt-tuning task with its head: ~16 KB of float32, written as
  safetensors bytes, as promptmux stores a task), in transactions of 1,000;
- open the store in a fresh process: time and RSS;
- point reads by name under Zipf(1.0) popularity, page cache warm: p50 / p99;
- one add and one remove, each its own durable transaction (fsync), while the store holds N: p50 / p99;
- 4 writer processes adding and removing 200 tasks each at once: nothing lost, total time;
- bytes on disk.
Prints the results with the machine and the load average; --out writes them as JSON (results/bank-store-*).
LMDB is not a promptmux dependency: pip install lmdb to run this.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

HIDDEN, TOKENS, LABELS = 384, 8, 2  # the demo's MiniLM task: 8 virtual tokens, a 2-label head


def record(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return save({"prompt": rng.standard_normal((TOKENS, HIDDEN), dtype=np.float32),
                 "head/classifier.weight": rng.standard_normal((LABELS, HIDDEN), dtype=np.float32),
                 "head/classifier.bias": np.zeros(LABELS, np.float32)})


class Sqlite:
    def __init__(self, path: Path):
        import sqlite3

        self.db = sqlite3.connect(str(path / "bank.sqlite"), timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS tasks (name TEXT PRIMARY KEY, data BLOB) WITHOUT ROWID")

    def put_many(self, items):
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?)", items)
        self.db.execute("COMMIT")

    def delete(self, name):
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM tasks WHERE name = ?", (name,))
        self.db.execute("COMMIT")

    def get(self, name):
        row = self.db.execute("SELECT data FROM tasks WHERE name = ?", (name,)).fetchone()
        return row[0]

    def count(self):
        return self.db.execute("SELECT count(*) FROM tasks").fetchone()[0]


class Lmdb:
    def __init__(self, path: Path):
        import lmdb

        self.env = lmdb.open(str(path / "bank.lmdb"), map_size=1 << 40, max_readers=256, sync=True)

    def put_many(self, items):
        with self.env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k.encode(), v)

    def delete(self, name):
        with self.env.begin(write=True) as txn:
            txn.delete(name.encode())

    def get(self, name):
        with self.env.begin(buffers=True) as txn:
            return bytes(txn.get(name.encode()))

    def count(self):
        return self.env.stat()["entries"]


STORES = {"sqlite-wal": Sqlite, "lmdb": Lmdb}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _writer(store: str, folder: str, worker: int, n: int) -> None:
    s = STORES[store](Path(folder))
    for j in range(n):
        s.put_many([(f"w{worker}-{j}", record(j))])
    for j in range(0, n, 2):
        s.delete(f"w{worker}-{j}")


def child_open(store: str, folder: str, n: int, reads: int) -> dict:
    """In a fresh process: open, read under Zipf popularity, add/remove one task at a time."""
    base = rss_mb()
    t = time.perf_counter()
    s = STORES[store](Path(folder))
    assert s.count() == n
    opened = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.0001, reads), n) - 1
    lat = []
    for r in ranks:
        t = time.perf_counter()
        arrays = load(s.get(f"t{r}"))
        lat.append(time.perf_counter() - t)
    assert arrays["prompt"].shape == (TOKENS, HIDDEN)
    add, rem = [], []
    for j in range(200):
        t = time.perf_counter()
        s.put_many([(f"new{j}", record(j))])
        add.append(time.perf_counter() - t)
        t = time.perf_counter()
        s.delete(f"new{j}")
        rem.append(time.perf_counter() - t)

    def ms(x, q):
        return round(float(np.percentile(x, q)) * 1e3, 3)

    return {"open_s": round(opened, 4), "rss_growth_after_reads_mb": round(rss_mb() - base, 1),
            "read_p50_ms": ms(lat, 50), "read_p99_ms": ms(lat, 99),
            "add_p50_ms": ms(add, 50), "add_p99_ms": ms(add, 99), "remove_p50_ms": ms(rem, 50),
            "remove_p99_ms": ms(rem, 99)}


def run(store: str, n: int, reads: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bank-{store}-", dir=os.environ.get("BANK_STUDY_DIR")))
    try:
        s = STORES[store](folder)
        t = time.perf_counter()
        for start in range(0, n, 1000):
            s.put_many([(f"t{i}", record(i)) for i in range(start, min(n, start + 1000))])
        load_s = time.perf_counter() - t
        del s
        out = {"store": store, "tasks": n, "bulk_load_s": round(load_s, 1)}
        child = subprocess.run([sys.executable, __file__, "--child", store, str(folder), str(n), str(reads)],
                               check=True, capture_output=True, text=True)
        out.update(json.loads(child.stdout.strip().splitlines()[-1]))
        t = time.perf_counter()
        procs = [mp.Process(target=_writer, args=(store, str(folder), w, 200)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        out["writers_4x200_s"] = round(time.perf_counter() - t, 2)
        s = STORES[store](folder)
        out["lost_changes"] = n + 4 * 100 - s.count()  # each writer keeps its odd-numbered half
        out["disk_mb"] = round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--reads", type=int, default=20_000)
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        store, folder, n, reads = args.child
        print(json.dumps(child_open(store, folder, int(n), int(reads))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from promptmux.runtime.cpu import describe

    results = {"machine": describe(), "load_average_start": os.getloadavg(), "record_bytes": len(record(0)),
               "stores": [run(s, args.tasks, args.reads) for s in STORES]}
    results["load_average_end"] = os.getloadavg()
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
