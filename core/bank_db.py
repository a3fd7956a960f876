"""The prompt bank's SQLite connections (core/bank.py holds the tables' meaning): the bank's own, which every
change and every cache check goes through, and one per reading thread for cold task reads, so that a task read
from disk blocks neither other readers nor the hot path (WAL: readers see a committed snapshot and never wait)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("promptmux")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                                  entry TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS shared (key TEXT PRIMARY KEY, refs INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                                    avg BLOB NOT NULL, tok BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vectors_gone (seq INTEGER PRIMARY KEY AUTOINCREMENT, id INTEGER NOT NULL);
"""


BUSY_SECONDS = 60  # how long a writer waits for another process's transaction


def begin_write(db: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE without waiting: False while another connection holds the store's write lock."""
    db.execute("PRAGMA busy_timeout = 0")
    try:
        db.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e):
            raise
        return False
    finally:
        db.execute(f"PRAGMA busy_timeout = {BUSY_SECONDS * 1000}")


def connect(path: Path | None) -> sqlite3.Connection:
    # One connection per bank, shared by the threads of a process under the bank's lock; autocommit mode, with
    # explicit transactions. A writer waits up to a minute for another process's transaction.
    if path is not None and not os.access(path.parent, os.W_OK):
        return connect_read_only(path)
    db = sqlite3.connect(":memory:" if path is None else str(path), timeout=BUSY_SECONDS, isolation_level=None,
                         check_same_thread=False)
    try:
        if path is not None:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed change survives a power loss, not only a crash
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:  # a damaged, truncated or foreign file: say which, and what to do
        db.close()
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise
        raise ValueError(f"the task store {path} cannot be read ({e}): restore it from a backup, or export the "
                         "deployment again") from None
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'summaries'").fetchone():
        migrate_summaries(db)
    return db


def connect_read_only(path: Path) -> ReadOnlyConnection:
    """A store in a folder this process cannot write (a read-only volume, an image layer, a serving pod's read-only
    mount of a folder an admin writes through another path): see ReadOnlyConnection."""
    return ReadOnlyConnection(path)


def store_stamp(path: Path) -> tuple:
    """What changes on disk when any process writes the store: its file's and its log's size and mtime, and
    whether its -shm file exists."""
    def of(p: str):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    return of(str(path)), of(f"{path}-wal"), os.path.exists(f"{path}-shm")


class ReadOnlyConnection:
    """A read-only connection that is opened again whenever the store's files change on disk (store_stamp: two
    stats and an exists a call), so a writer on another path is seen at the next query. SQLite cannot make a WAL
    store's -shm file in a read-only folder: where a writer has made one, the connection reads live (mode=ro, the
    log included); where none exists, no process has the store open and the file is whole, so it is read immutable
    (no locks, no log) until it changes. A log left with changes and no -shm (a writer killed) is refused at open."""

    def __init__(self, path: Path):
        self.path, self.generation, self.lock = path, 0, threading.Lock()
        self.stamp, self.conn = store_stamp(path), _open_read_only(path)

    def execute(self, *args):
        if store_stamp(self.path) != self.stamp:
            self._reopen()
        return self.conn.execute(*args)

    def _reopen(self) -> None:
        with self.lock:
            stamp = store_stamp(self.path)
            if stamp == self.stamp:
                return
            try:
                conn = _open_read_only(self.path)
            except (PermissionError, sqlite3.DatabaseError) as e:  # caught mid-change: the next query tries again
                log.warning("the read-only task store %s changed and cannot be read yet (%s)", self.path, e)
                return
            old, self.conn, self.stamp = self.conn, conn, stamp
            self.generation += 1  # the bank's data version: every cached task is checked again
            old.close()

    def backup(self, *args, **kwargs):
        return self.conn.backup(*args, **kwargs)

    def close(self) -> None:
        self.conn.close()


def _open_read_only(path: Path) -> sqlite3.Connection:
    try:
        return _checked(_open_live_read_only(path), path)
    except sqlite3.DatabaseError:
        pass
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise PermissionError(f"{path.parent} is read-only and its task store has changes not yet merged into it "
                              f"({wal.name}); open the deployment once where it can be written (any promptmux "
                              "command that opens it merges them), then make it read-only")
    return _checked(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None,
                                    check_same_thread=False), path)


def _open_live_read_only(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_SECONDS, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the log: fails without a -shm file
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _checked(db: sqlite3.Connection, path: Path) -> sqlite3.Connection:
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'summaries'").fetchone():
        raise PermissionError(f"{path} was written by promptmux before 2026-12-03 and {path.parent} is read-only; "
                              "open the deployment once where it can be written (it is migrated then)")
    return db


def migrate_summaries(db: sqlite3.Connection) -> None:
    """Stores of 2026-12-02 kept the retrieval vectors in `summaries`, without the growing ids the index needs."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'summaries'").fetchone():  # not done by another
            db.execute("INSERT INTO vectors (name, avg, tok) SELECT name, avg, tok FROM summaries")
            db.execute("DROP TABLE summaries")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def connect_reader(path: Path) -> sqlite3.Connection:
    """A connection that only reads the store at `path` (immutable where the folder is read-only, as the bank's own
    connection is there)."""
    if not os.access(path.parent, os.W_OK):
        return connect_read_only(path)
    # query_only, not mode=ro: the last connection to close merges the log into the store, and a mode=ro one
    # cannot, so a reader that outlived the bank's own connection left a log behind (and a folder copied then
    # made read-only refused to open).
    db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA query_only=ON")
    return db
