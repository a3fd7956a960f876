"""Retrieval's index over a prompt bank: every input-level task's two retrieval vectors (core/bank.py `vectors`) as
float32 matrices, so ranking a million tasks is one matrix-vector product instead of a million rows read from SQLite
(5 to 7 s per query at 1,000,000 tasks; studies/retrieval_scale.py).

The store stays the truth; the index is derived from it and never written to by a change:
- `vectors` gives every row an id that only grows (AUTOINCREMENT), and a removal logs the id in `vectors_gone`,
  in the change's own transaction. So the index catches up with any number of changes, by any process, from two
  index seeks: rows with an id above the last it saw, removals logged after the last it applied.
- In memory the index is a base (ids ascending, matrices, an alive mask) plus the rows added since.
- A bank of SNAPSHOT_MIN rows or more keeps its base on disk beside the store (`retrieval/`, .npy files read
  memory-mapped), so a fresh process ranks without reading the store. The snapshot is rewritten when the rows
  changed since it reach max(REWRITE_MIN, rows / 32); where the folder is read-only the index stays in memory.

float32 rather than the store's float16: numpy converts float16 at about 0.5 G values/s, which alone is 0.7 s per
query at a million 384-wide tasks, while BLAS reads float32 from the page cache in 0.06 s (AMD Zen 4, 2 cores).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import sqlite3
import threading
import uuid
import weakref
from pathlib import Path

import numpy as np

from .durable import write_durably

log = logging.getLogger("promptmux")

METHOD_COLUMNS = {"avg-cosine": "avg", "per-token-cosine": "tok"}
SNAPSHOT_DIR = "retrieval"
SNAPSHOT_MIN = 50_000  # smaller banks build the index from the store in well under a second
REWRITE_MIN = 4096


class VectorIndex:
    def __init__(self, bank):
        self._bank = weakref.ref(bank)  # the bank keeps its index: no cycle back, so a dropped bank closes at once
        self.ids = np.zeros(0, np.int64)  # base rows, ascending
        self.mats: dict[str, np.ndarray] = {}
        self.alive = np.zeros(0, bool)
        self.extra: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # rows added since the base, by id
        self.last_id = 0
        self.last_gone = 0
        self.dim = 0
        self.loaded = False
        self._lock = threading.Lock()

    @property
    def bank(self):
        bank = self._bank()
        if bank is None:
            raise RuntimeError("this index's prompt bank is gone; open the deployment again")
        return bank

    @property
    def folder(self) -> Path | None:
        return None if self.bank.path is None else self.bank.path.parent / SNAPSHOT_DIR

    def __len__(self) -> int:
        return int(self.alive.sum()) + len(self.extra)

    # ---- ranking -------------------------------------------------------------------------
    def scores(self, method: str, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores): every live row's dot product with `query` [dim], for `method`'s vectors."""
        with self._lock:
            self.refresh()
            return self._scores(METHOD_COLUMNS[method], query)

    def _scores(self, col: str, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(query, np.float32)
        ids, parts = [self.ids[self.alive]], []
        if len(self.ids):
            s = self.mats[col] @ q
            parts.append(s[self.alive])
        if self.extra:
            ids.append(np.fromiter(self.extra, np.int64, len(self.extra)))
            parts.append(np.stack([v[0 if col == "avg" else 1] for v in self.extra.values()]) @ q)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(ids), np.concatenate(parts)

    def names(self, ids) -> dict[int, str]:
        """id -> task name for the live rows among `ids` (a row removed since it was scored is left out)."""
        ids = [int(i) for i in ids]
        out = {}
        with self.bank.lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                out.update(self.bank.db.execute(
                    f"SELECT id, name FROM vectors WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    # ---- catching up with the store ------------------------------------------------------
    def refresh(self) -> None:
        if not self.loaded:
            self.loaded = True
            if not self._load_snapshot():
                self._build()
                return
        db = self.bank.db
        with self.bank.lock:
            db.execute("BEGIN")  # one snapshot of the store for both reads
            try:
                new = db.execute("SELECT id, avg, tok FROM vectors WHERE id > ? ORDER BY id",
                                 (self.last_id,)).fetchall()
                gone = db.execute("SELECT seq, id FROM vectors_gone WHERE seq > ? ORDER BY seq",
                                  (self.last_gone,)).fetchall()
            finally:
                db.execute("COMMIT")
        for i, avg, tok in new:
            self.extra[i] = (_f32(avg), _f32(tok))
            self.dim = self.dim or len(self.extra[i][0])
            self.last_id = i
        if gone:
            self.last_gone = gone[-1][0]
            for _, i in gone:
                if self.extra.pop(i, None) is None:
                    at = int(np.searchsorted(self.ids, i))
                    if at < len(self.ids) and self.ids[at] == i:
                        self.alive[at] = False
        changed = len(self.extra) + int(len(self.ids) - self.alive.sum())
        if changed >= max(REWRITE_MIN, len(self) // 32):  # a small bank's too: each query stacks the rows added since
            self._compact()

    def _build(self) -> None:
        """The whole index from the store (a bank's first query, when no snapshot can be used)."""
        db = self.bank.db
        ids, mats = [], {"avg": [], "tok": []}
        with self.bank.lock:  # read in blocks: a million rows as Python bytes would be gigabytes at once
            db.execute("BEGIN")
            try:
                self.last_gone = db.execute("SELECT coalesce(max(seq), 0) FROM vectors_gone").fetchone()[0]
                cursor = db.execute("SELECT id, avg, tok FROM vectors ORDER BY id")
                read = 0
                while rows := cursor.fetchmany(1 << 15):
                    if read < SNAPSHOT_MIN <= read + len(rows) and self.folder is not None:
                        log.warning("building the retrieval index of %s (once: it is kept in %s)", self.bank.path,
                                    self.folder)
                    read += len(rows)
                    ids.append(np.fromiter((r[0] for r in rows), np.int64, len(rows)))
                    for k, col in ((1, "avg"), (2, "tok")):
                        mats[col].append(np.frombuffer(b"".join(r[k] for r in rows), np.float16)
                                         .reshape(len(rows), -1).astype(np.float32))
            finally:
                db.execute("COMMIT")
        if ids:
            self.ids = np.concatenate(ids)
            self.mats = {col: np.concatenate(m) for col, m in mats.items()}
            self.dim = self.mats["avg"].shape[1]
            self.last_id = int(self.ids[-1])
        self.alive = np.ones(len(self.ids), bool)
        if self._wants_snapshot():
            self._write_snapshot()

    def _compact(self) -> None:
        """Fold the changes into a new base, and snapshot it where the bank keeps one."""
        keep = self.alive
        ids = [self.ids[keep]]
        mats = {col: [m[keep]] for col, m in self.mats.items()} if len(self.ids) else {"avg": [], "tok": []}
        if self.extra:
            ids.append(np.fromiter(self.extra, np.int64, len(self.extra)))
            for k, col in ((0, "avg"), (1, "tok")):
                mats[col].append(np.stack([v[k] for v in self.extra.values()]))
        self.ids = np.concatenate(ids)
        self.mats = {col: np.concatenate(m) if m else np.zeros((0, self.dim), np.float32) for col, m in mats.items()}
        self.alive = np.ones(len(self.ids), bool)
        self.extra = {}
        if self._wants_snapshot():
            self._write_snapshot()

    # ---- the snapshot on disk ------------------------------------------------------------
    def _wants_snapshot(self) -> bool:
        return self.folder is not None and len(self) >= SNAPSHOT_MIN

    def _store_id(self) -> str | None:
        row = self.bank.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        return row[0] if row else None

    def _load_snapshot(self) -> bool:
        folder = self.folder
        if folder is None or not (folder / "index.json").is_file():
            return False
        for attempt in range(3):
            state: dict = {}
            try:
                state = json.loads((folder / "index.json").read_text())
                with self.bank.lock:
                    if state["store_id"] != self._store_id():  # a snapshot of another store: the folder was reused
                        return False
                    if not self._same_history(state):
                        log.warning("the retrieval index in %s is ahead of the task store (restored from a backup?); "
                                    "rebuilding it from the store", folder)
                        return False
                gen = state["generation"]
                ids = np.load(folder / f"{gen}-ids.npy", mmap_mode="r")
                mats = {col: np.load(folder / f"{gen}-{col}.npy", mmap_mode="r") for col in ("avg", "tok")}
                if any(m.shape != (len(ids), state["dim"]) or m.dtype != np.float32 for m in mats.values()) \
                        or ids.dtype != np.int64 or len(ids) != state["rows"]:
                    raise ValueError("shapes do not match index.json")
                break
            except (OSError, ValueError, KeyError, TypeError) as e:
                if isinstance(e, FileNotFoundError) and attempt < 2 \
                        and _generation(folder) not in (None, state.get("generation")):
                    continue  # another process wrote a newer snapshot and deleted this one meanwhile
                log.warning("ignoring the retrieval index in %s (%s); rebuilding it from the store", folder, e)
                return False
        self.ids, self.mats, self.dim = ids, mats, state["dim"]
        self.alive = np.ones(len(ids), bool)
        self.last_id, self.last_gone = state["last_id"], state["last_gone"]
        return True

    def _same_history(self, state: dict) -> bool:
        """Whether the store still holds the rows the snapshot was made from. A store restored from a backup keeps
        its store_id but goes back in time, and its next rows reuse ids the snapshot already holds: the row at the
        snapshot's last id must be the one it saw (or removed since), and the store's counters not behind it."""
        db = self.bank.db
        seq = dict(db.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('vectors', 'vectors_gone')"))
        if seq.get("vectors", 0) < state["last_id"] or seq.get("vectors_gone", 0) < state["last_gone"]:
            return False
        if "last_name" not in state or not state["last_id"]:  # an older snapshot, or an empty one
            return True
        row = db.execute("SELECT name, avg FROM vectors WHERE id = ?", (state["last_id"],)).fetchone()
        if row is not None:  # its name and its vector: a restored store may get the lost tasks' names again, in order
            return row[0] == state["last_name"] and state.get("last_avg", _digest(row[1])) == _digest(row[1])
        return db.execute("SELECT 1 FROM vectors_gone WHERE id = ?", (state["last_id"],)).fetchone() is not None

    def _write_snapshot(self) -> None:
        """Write the base as a new generation of files, then point index.json at it (a rename: readers see the old
        snapshot or the new one), then delete older generations. One writer at a time (an OS file lock); a folder
        that cannot be written leaves the index in memory."""
        folder = self.folder
        try:
            with self.bank.lock:
                store_id = self._store_id()
            if store_id is None:  # a store's first snapshot names it: a change of the store, waited for as changes are
                with self.bank.transaction():  # (lookups go on while another process holds the write lock)
                    self.bank.db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
                with self.bank.lock:
                    store_id = self._store_id()
            folder.mkdir(exist_ok=True)
            with open(folder / "lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                for stale in folder.glob(".index.json-*"):  # a write killed midway (the only writer holds the lock)
                    stale.unlink(missing_ok=True)
                gen = uuid.uuid4().hex[:12]
                np.save(folder / f"{gen}-ids.npy", np.ascontiguousarray(self.ids))
                for col, m in self.mats.items():
                    np.save(folder / f"{gen}-{col}.npy", np.ascontiguousarray(m))
                with self.bank.lock:
                    last = self.bank.db.execute("SELECT name, avg FROM vectors WHERE id = ?",
                                                (self.last_id,)).fetchone()
                state = {"store_id": store_id, "generation": gen, "rows": len(self.ids), "dim": self.dim,
                         "last_id": self.last_id, "last_gone": self.last_gone, "last_name": last and last[0],
                         "last_avg": last and _digest(last[1])}
                write_durably(folder / "index.json", json.dumps(state))
                for p in folder.glob("*.npy"):
                    if not p.name.startswith(gen + "-"):
                        p.unlink(missing_ok=True)  # a reader that mapped it keeps its pages
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot write the retrieval index to %s (%s); it stays in memory", folder, e)
            return
        self._load_snapshot()  # the same base, mapped from the page cache instead of held in this process


def _generation(folder: Path) -> str | None:
    """The generation index.json points at now, or None."""
    try:
        return json.loads((folder / "index.json").read_text()).get("generation")
    except (OSError, ValueError, AttributeError):
        return None


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def _f32(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.float16).astype(np.float32)
