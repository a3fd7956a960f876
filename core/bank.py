"""The prompt bank: every task's prompt (and classification head), one record per task in an embedded store.

The store is SQLite in WAL mode (`tasks.sqlite` in the deployment folder; studies/bank_store.py measured it against
LMDB, see ARCHITECTURE.md "The prompt bank"). Tables:
    tasks(seq, name, entry, data)   one row per task. entry: JSON (kind, PEFT type, virtual tokens, shapes, the
                                    shared tensors it uses, head parameters, labels, source); data: the task's own
                                    tensors as safetensors bytes (roles of its kind, head/<param>). seq is the
                                    task's version: a new one at every write (a replaced task moves to the end).
    shared(key, refs, data)         the roles a kind shares between tasks (MPT's shared prompt), once per value
    meta(key, value)                the task count and the base model's head (safetensors bytes)
    vectors(id, name, avg, tok)     input-level tasks: two float16 vectors [d] whose dot products with a query's
                                    are retrieval's two similarities (library/retrieval.py); id only grows
    vectors_gone(seq, id)           removed vectors rows' ids, in order: how core/vector_index.py catches up
Every change is one transaction (many readers, one writer, across processes: SQLite's own locking), so a reader
sees a task as it was or as it is, never half of each, and a writer killed midway leaves the last committed state.
Readers load one task on demand into a small LRU of views bounded in bytes; a change committed by another process
is seen at the next lookup of that task (SQLite's data_version says when anything changed). A cold read goes through
the reading thread's own connection (core/bank_db.py) without the bank's lock, so hot lookups and other cold reads
go on meanwhile; threads asking for the same cold task wait for one read.

A bank made in memory (the export's, or a runtime's after a change it does not persist) is a SQLite database in
memory, written to a folder with SQLite's backup API. Deployments written before the store (`bank.safetensors`, its
index in the file's metadata) open as they are, read into memory, and are migrated to the store by their first
persisted change (core/folder.py update_tasks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from .archs import ArchSpec
from .bank_db import BUSY_SECONDS, begin_write, connect, connect_reader
from .bank_errors import (  # noqa: F401 (UnknownTaskError and LISTED_IN_ERRORS re-exported)
    LISTED_IN_ERRORS,
    UnknownTaskError,
    already_in_bank,
    unknown_cursor,
    unknown_task,
)
from .bank_legacy import LEGACY_FILE  # noqa: F401 (the bank before the store; re-exported)
from .bank_vectors import prompt_summaries, summaries  # noqa: F401 (prompt_summaries re-exported)
from .durable import fsync_file
from .task import Task, task_name

STORE_FILE = "tasks.sqlite"
DEFAULT_CACHE_BYTES = 256 * 2**20  # hot task views kept in RAM; PromptBank(cache_bytes=...) or --bank-cache-mb


class PromptBank:
    """The tasks of one deployment. PromptBank(spec) is an empty bank in memory; PromptBank.load(folder, spec) opens
    a deployment's store (or reads an old deployment's bank.safetensors into memory)."""

    def __init__(self, spec: ArchSpec, base_head: dict[str, np.ndarray] | None = None, path: Path | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.spec = spec
        self.path = path  # the store file, or None in memory
        self.db = connect(path)
        self.cache_bytes = cache_bytes
        self.lock = threading.RLock()
        self._views: OrderedDict[str, Task] = OrderedDict()  # LRU, most recent last
        self._view_bytes = 0
        self._checked: dict[str, int] = {}  # name -> data_version at which its cached view was last confirmed
        self._shared: dict[str, np.ndarray] = {}  # shared tensors of cached views
        self.stats = {"hits": 0, "misses": 0, "loads": 0, "load_seconds": 0.0}
        self._index = None
        self._loading: dict[str, threading.Event] = {}  # cold tasks being read, by name
        self._thread = threading.local()  # each thread's reader connection
        self._readers: list[tuple[threading.Thread, sqlite3.Connection]] = []
        if base_head:
            with self.transaction():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('base_head', ?)",
                                (save_tensors({k: np.ascontiguousarray(v, np.float32) for k, v in base_head.items()}),))
        row = self.db.execute("SELECT value FROM meta WHERE key = 'base_head'").fetchone()
        self.base_head = load_tensors(row[0]) if row else {}

    # ---- queries -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every task name, oldest write first (reads the store: O(tasks))."""
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT name FROM tasks ORDER BY seq")]

    def __contains__(self, name: str) -> bool:
        key = task_name(name) if isinstance(name, str) else name
        with self.lock:
            return self.db.execute("SELECT 1 FROM tasks WHERE name = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()
            return int(row[0]) if row else 0

    def count_of(self, names) -> int:
        """How many of these names the bank holds: a query per 500 names, not one per name."""
        names, query = list(names), "SELECT count(*) FROM tasks WHERE name IN ({})"
        with self.lock:
            chunks = [names[i:i + 500] for i in range(0, len(names), 500)]
            return sum(self.db.execute(query.format(",".join("?" * len(c))), c).fetchone()[0] for c in chunks)

    def unknown(self, name: str) -> UnknownTaskError:
        return unknown_task(name, len(self), self.names)

    def page(self, limit: int, after: str | None = None) -> tuple[list[str], bool]:
        """Up to `limit` task names in the bank's order (oldest write first: the sample of the first tasks that
        contracts and calibration take) after the name `after` (a cursor: the last name of the previous page), and
        whether more follow. An unknown cursor is an UnknownTaskError. Listings use listing()."""
        with self.lock:
            start = 0
            if after is not None:
                row = self.db.execute("SELECT seq FROM tasks WHERE name = ?", (after,)).fetchone()
                if row is None:
                    raise unknown_cursor(after)
                start = row[0]
            names = [r[0] for r in self.db.execute("SELECT name FROM tasks WHERE seq > ? ORDER BY seq LIMIT ?",
                                                   (start, limit + 1))]
        return names[:limit], len(names) > limit

    def listing(self, limit: int, after: str | None = None) -> tuple[list[str], bool]:
        """page() for listings: in name order (code points), the cursor may be gone since. A task replaced or removed
        while a client walks the pages moves nothing, so each task there throughout is listed once."""
        with self.lock:
            names = [r[0] for r in self.db.execute("SELECT name FROM tasks WHERE name > ? ORDER BY name LIMIT ?",
                                                   (after or "", limit + 1))]
        return names[:limit], len(names) > limit

    def entry(self, name: str) -> dict:
        """The task's record without its tensors (kind, PEFT type, virtual tokens, shapes, shared keys, ...)."""
        with self.lock:
            row = self.db.execute("SELECT entry FROM tasks WHERE name = ?", (task_name(name),)).fetchone()
        if row is None:
            raise self.unknown(name)
        return json.loads(row[0])

    def view(self, name: str) -> Task:
        """The task, its tensors read from the store on first use and kept while it is hot. A cold read holds no
        lock (its thread's own connection), and threads asking for the same cold task wait for one read."""
        name = task_name(name)  # views are cached by name: a numpy string must not name the cached Task
        while True:
            with self.lock:
                cached = self._fresh(name)
                if cached is not None:
                    self.stats["hits"] += 1
                    return cached
                loading = self._loading.get(name)
                if loading is None:
                    loading = self._loading[name] = threading.Event()
                    self.stats["misses"] += 1
                    break
            loading.wait()  # another thread reads it: then a hit (or, if that read failed, read it here)
        try:
            return self._load(name)
        finally:
            with self.lock:
                del self._loading[name]
            loading.set()

    def _fresh(self, name: str) -> Task | None:
        """The cached view of `name`, unless another process changed the task since it was read (under the lock)."""
        cached = self._views.get(name)
        if cached is None:
            return None
        version = self._data_version()
        if self._checked.get(name) != version:
            if self._stored_version(name) != cached.version:  # changed by another process since it was read
                self._drop(name)
                return None
            self._checked[name] = version
        self._views.move_to_end(name)
        return cached

    def _load(self, name: str) -> Task:
        started = time.perf_counter()
        for attempt in range(100):  # each retry is a change committed meanwhile: bounded, never a spin
            if self.path is None:  # in memory: one connection, the bank's
                with self.lock:
                    read = self._read(self.db, name)
            else:
                read = self._read(self._reader(), name)
            if read is None:
                raise self.unknown(name)
            seq, entry, own, shared = read
            with self.lock:  # kept only if still the stored version (a change may have committed meanwhile)
                version = self._data_version()  # read first: a commit after it makes the next lookup check again
                if self._stored_version(name) != seq and attempt < 99:
                    continue
                for key, value in shared.items():
                    self._shared.setdefault(key, value)
                view = self._make_view(name, seq, entry, own)
                self.stats["loads"] += 1
                self.stats["load_seconds"] += time.perf_counter() - started
                self._keep(view, version)
                return view

    def _read(self, db: sqlite3.Connection, name: str):
        """(seq, entry, own tensors, shared tensors not cached yet) of one task, from one snapshot (another process
        may remove it in between), or None."""
        db.execute("BEGIN")
        try:
            row = db.execute("SELECT seq, entry, data FROM tasks WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            entry = json.loads(row[1])
            blobs = {key: db.execute("SELECT data FROM shared WHERE key = ?", (key,)).fetchone()[0]
                     for key in entry["tensors"].values() if key is not None and key not in self._shared}
        finally:
            db.execute("COMMIT")
        return row[0], entry, load_tensors(row[2]), {k: load_tensors(v)["value"] for k, v in blobs.items()}

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._thread, "db", None)
        if db is None:
            db = self._thread.db = connect_reader(self.path)
            with self.lock:  # threads come and go (one per request, in some apps): the ended ones' connections go
                for thread, old in self._readers:
                    if not thread.is_alive():
                        old.close()
                self._readers = [r for r in self._readers if r[0].is_alive()] + [(threading.current_thread(), db)]
        return db

    def _data_version(self) -> tuple[int, int]:  # a read-only store's connection counts its reopenings too
        return getattr(self.db, "generation", 0), self.db.execute("PRAGMA data_version").fetchone()[0]

    def _shared_tensor(self, key: str) -> np.ndarray:
        if key not in self._shared:
            row = self.db.execute("SELECT data FROM shared WHERE key = ?", (key,)).fetchone()
            self._shared[key] = load_tensors(row[0])["value"]
        return self._shared[key]

    def _make_view(self, name: str, seq: int, e: dict, own: dict[str, np.ndarray]) -> Task:
        tensors = {role: own[role] if key is None else self._shared_tensor(key) for role, key in e["tensors"].items()}
        layers = []
        for layer in self.spec.head:
            params = []
            for p in ("weight", "bias"):
                key = f"{layer.module}.{p}"
                params.append(own.get(f"head/{key}", self.base_head.get(key)))
            if params[0] is None:
                raise ValueError(f"task {name!r}: no weights for head module {layer.module!r}")
            layers.append((params[0], params[1], layer))
        head = {k[len("head/"):]: v for k, v in own.items() if k.startswith("head/")}
        return Task(name=name, kind=e["kind"], peft_type=e["peft_type"], num_virtual_tokens=e["num_virtual_tokens"],
                    tensors=tensors, head=head, labels=e.get("labels"), source=e.get("source", ""), layers=layers,
                    version=seq)

    def _keep(self, view: Task, version: int) -> None:
        self._views[view.name] = view
        self._checked[view.name] = version
        self._view_bytes += _nbytes(view)
        while self._view_bytes > self.cache_bytes and len(self._views) > 1:
            self._drop(next(iter(self._views)))

    def _drop(self, name: str) -> None:
        view = self._views.pop(name, None)
        self._checked.pop(name, None)
        if view is not None:
            self._view_bytes -= _nbytes(view)
        if not self._views:
            self._shared.clear()

    def holds(self, view: Task) -> bool:
        """Whether the bank still holds this very task (not replaced or removed since the view was read)."""
        with self.lock:
            return self._stored_version(view.name) == view.version

    def _stored_version(self, name: str) -> int | None:
        """The stored task's version (seq), or None: the bank's own connection, under the lock."""
        row = self.db.execute("SELECT seq FROM tasks WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def digest(self, name: str) -> str:
        """A fingerprint of one task's prompt and head tensors (detects a task replaced under its name)."""
        view = self.view(name)
        h = hashlib.sha256()
        for key, value in sorted([(f"tensor/{r}", v) for r, v in view.tensors.items()]
                                 + [(f"head/{p}", v) for p, v in view.head.items()]):
            h.update(key.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()

    def describe(self, names: list[str] | None = None) -> list[dict]:
        """One JSON-able row per task (for `promptmux tasks list` and the server's listings); names: only these."""
        rows = []
        for name in self.names() if names is None else names:
            try:
                e = self.entry(name)
            except UnknownTaskError:  # removed since the names were read (a page, while another process changes)
                continue
            row = {"name": name, "kind": e["kind"], "peft_type": e["peft_type"],
                   "num_virtual_tokens": e["num_virtual_tokens"], "shapes": e["shapes"], "dtype": "float32",
                   "source": e.get("source", "")}
            if self.spec.head:
                row["num_labels"] = e["num_labels"]
                row["labels"] = e.get("labels")
            rows.append(row)
        return rows

    def cache_used(self) -> int:
        """Bytes of the task views held in RAM now."""
        return self._view_bytes

    def size_bytes(self) -> int:
        """Bytes of the store on disk (with its write-ahead log), 0 in memory."""
        if self.path is None:
            return 0
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    # ---- changes: each one transaction -----------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        """One write transaction: BEGIN IMMEDIATE takes the store's write lock, so nothing another writer commits
        falls between what a change reads and what it writes. While another process holds that lock (a large add),
        this one polls for it without holding the bank's lock: its lookups and requests go on meanwhile."""
        deadline, pause = time.monotonic() + BUSY_SECONDS, 0.001
        while True:
            with self.lock:
                if self.path is not None and not os.access(self.path.parent, os.W_OK):
                    raise PermissionError(f"{self.path.parent} is read-only: a persisted task change cannot be "
                                          "written there; change tasks without persist (they stay in this process), "
                                          "or deploy the folder writable")
                if begin_write(self.db):
                    self.lock.acquire()  # held through the change: released below
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the task store {self.path} stayed locked by another process's change for "
                                   f"{BUSY_SECONDS} s; try again when that change ends")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self.lock.release()

    def adapter_names(self, name: str) -> list[str]:
        """The tasks of the adapter NAME: NAME, or an MPT adapter's NAME/0 ... (NAME/ up to NAME0, by the index)."""
        return [r[0] for r in self.db.execute("SELECT name FROM tasks WHERE name = ? OR (name > ? AND name < ?)",
                                              (name, name + "/", name + "0"))]

    def add(self, tasks: list[Task], replace: bool = False) -> list[str]:
        """Add tasks in one transaction; replace=True: the tasks of the same adapters are replaced (all of an MPT
        adapter's, however many the new one has). Returns the names added."""
        from promptmux.kinds import kind_of

        records = []
        for t in tasks:  # everything checked and serialised before the store is touched
            shared_roles = kind_of(t).shared_roles
            own, refs, shapes = {}, {}, {}
            for role, value in t.tensors.items():
                value = np.ascontiguousarray(value, dtype=np.float32)
                shapes[role] = list(value.shape)
                if role in shared_roles:
                    key = "shared/" + hashlib.sha256(value.tobytes() + str(value.shape).encode()).hexdigest()[:20]
                    refs[role] = (key, value)
                else:
                    own[role] = value
            for param, value in t.head.items():
                own[f"head/{param}"] = np.ascontiguousarray(value, dtype=np.float32)
            entry = {"kind": t.kind, "peft_type": t.peft_type, "num_virtual_tokens": t.num_virtual_tokens,
                     "tensors": {role: refs[role][0] if role in refs else None for role in t.tensors},
                     "shapes": shapes, "labels": t.labels, "source": t.source}
            probe = self._make_view(t.name, 0, {**entry, "tensors": {r: None for r in t.tensors}},
                                    {**own, **{r: v for r, (_, v) in refs.items()}})  # the head must be complete
            if self.spec.head:
                entry["num_labels"] = int(probe.layers[-1][0].shape[0])
            records.append((task_name(t.name), entry, save_tensors(own), refs, summaries(t)))  # as looked up: NFC
        with self.transaction():
            bases = dict.fromkeys(n.split("/")[0] for n, *_ in records)  # the adapters: an MPT one's tasks are NAME/i
            clash = [n for base in bases for n in self.adapter_names(base)]
            if clash and not replace:
                raise already_in_bank(clash)
            for name in clash:
                self._delete(name)
            for name, entry, data, refs, summary in records:
                if summary is not None:
                    self.db.execute("INSERT INTO vectors (name, avg, tok) VALUES (?, ?, ?)", (name, *summary))
                for key, value in refs.values():
                    updated = self.db.execute("UPDATE shared SET refs = refs + 1 WHERE key = ?", (key,)).rowcount
                    if not updated:
                        self.db.execute("INSERT INTO shared VALUES (?, 1, ?)", (key, save_tensors({"value": value})))
                self.db.execute("INSERT INTO tasks (name, entry, data) VALUES (?, ?, ?)",
                                (name, json.dumps(entry), data))
                self._drop(name)
            self._count(len(records) - len(clash))
        return [name for name, *_ in records]

    def remove(self, name: str) -> list[str]:
        """Remove a task, or every task of an MPT adapter (`NAME` removes `NAME/0` ... `NAME/K-1`), in one
        transaction."""
        name = task_name(name)
        with self.transaction():
            names = self.adapter_names(name)
            if not names:
                raise self.unknown(name)
            for n in names:
                self._delete(n)
            self._count(-len(names))
        return names

    def _delete(self, name: str) -> None:
        entry = json.loads(self.db.execute("SELECT entry FROM tasks WHERE name = ?", (name,)).fetchone()[0])
        for key in entry["tensors"].values():
            if key is not None:
                self.db.execute("UPDATE shared SET refs = refs - 1 WHERE key = ?", (key,))
        self.db.execute("DELETE FROM shared WHERE refs <= 0")
        self.db.execute("DELETE FROM tasks WHERE name = ?", (name,))
        row = self.db.execute("SELECT id FROM vectors WHERE name = ?", (name,)).fetchone()
        if row is not None:
            self.db.execute("DELETE FROM vectors WHERE id = ?", row)
            self.db.execute("INSERT INTO vectors_gone (id) VALUES (?)", row)
        self._drop(name)

    def _count(self, delta: int) -> None:
        self.db.execute("INSERT INTO meta VALUES ('count', ?) ON CONFLICT(key) DO UPDATE SET value = value + ?",
                        (delta, delta))

    def vector_index(self):
        """Retrieval's index over this bank's input-level tasks (core/vector_index.py), made on first use."""
        from .vector_index import VectorIndex

        with self.lock:
            if self._index is None:
                self._index = VectorIndex(self)
            return self._index

    def shared_count(self) -> int:
        """Distinct shared tensors stored (MPT's shared prompts)."""
        with self.lock:
            return self.db.execute("SELECT count(*) FROM shared").fetchone()[0]

    # ---- storage -------------------------------------------------------------------------
    def copy(self) -> PromptBank:
        """This bank in memory (SQLite's backup API): changes to the copy stay out of the deployment."""
        other = PromptBank(self.spec, cache_bytes=self.cache_bytes)
        with self.lock:
            self.db.backup(other.db)
        other.base_head = dict(self.base_head)
        return other

    def save(self, folder: str | Path) -> Path:
        """Write this bank as a new folder's store (the export writes a temporary folder renamed at the end)."""
        return self.save_as(Path(folder) / STORE_FILE)

    def save_as(self, path: Path) -> Path:
        """Write this bank as a store file at `path` (which must not exist), fsynced, in one file (no log)."""
        dest = sqlite3.connect(str(path), isolation_level=None)
        try:
            with self.lock:
                self.db.backup(dest)
            dest.execute("DELETE FROM meta WHERE key = 'store_id'")  # a new store: no retrieval snapshot is its
            dest.execute("PRAGMA journal_mode=DELETE")  # one file to rename; readers switch it to WAL
        finally:
            dest.close()
        fsync_file(path)
        return path

    def close(self) -> None:
        for _, db in self._readers:
            db.close()
        self.db.close()

    def __del__(self):
        # sqlite3's connections sit in reference cycles of their own (their statement caches), so a dropped bank's
        # files stayed open until Python's cycle collector ran: `fast` opens the deployment once per candidate.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a half-made bank, or interpreter shutdown
            pass

    @classmethod
    def load(cls, folder: str | Path, spec: ArchSpec, cache_bytes: int = DEFAULT_CACHE_BYTES) -> PromptBank:
        folder = Path(folder)
        if (folder / STORE_FILE).is_file():
            return cls(spec, path=folder / STORE_FILE, cache_bytes=cache_bytes)
        if (folder / LEGACY_FILE).is_file():
            from .bank_legacy import load_legacy

            return load_legacy(cls, folder, spec, cache_bytes)
        raise FileNotFoundError(f"{folder} has no prompt bank ({STORE_FILE}): it is not a promptmux deployment (run "
                                "promptmux export)")


def _nbytes(view: Task) -> int:
    return sum(v.nbytes for v in view.tensors.values()) + sum(v.nbytes for v in view.head.values())
