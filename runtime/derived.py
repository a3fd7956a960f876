"""Files derived from a deployment's graph (OpenVINO IR, int8 copies): made once, reused while the graph is
unchanged. A JSON stamp beside each records the identity of the graph it was made from."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from promptmux.core.durable import write_durably


def graph_key(path: Path) -> str:
    """Identity of a graph file and its weights: a digest of their names and contents. A re-export gives another key;
    a copy of the deployment keeps it (`cp -r` or an object-store sync gives the files new mtimes, and keying on
    mtimes made such a copy quantize and convert again: minutes of NNCF). The digest is kept in a hidden file beside
    the graph with the sizes and mtimes it was read at, so an open hashes only after the files changed or were copied
    (0.15 s for MiniLM's 91 MB on a 2-core Xeon, then 0.1 ms); a read-only folder hashes at each open."""
    files = [f for f in (path, path.with_name(path.name + ".data")) if f.is_file()]
    seen = [[f.name, st.st_size, st.st_mtime_ns] for f, st in ((f, f.stat()) for f in files)]
    kept = path.with_name(f".{path.name}.sha256")
    try:
        record = json.loads(kept.read_text())
        if record["files"] == seen:
            return record["key"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as data:
            while chunk := data.read(1 << 20):
                h.update(chunk)
    key = h.hexdigest()[:16]
    try:
        write_durably(kept, json.dumps({"files": seen, "key": key}))
    except OSError:  # a read-only deployment: hashed again next time
        pass
    return key


def is_current(made: Path, stamp: Path, key: str) -> bool:
    """Whether `made` exists and its stamp names the graph identity `key` (a torn stamp counts as stale)."""
    if not (made.is_file() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("graph_key") == key
    except ValueError:
        return False


def write_stamp(stamp: Path, key: str, **facts) -> None:
    stamp.write_text(json.dumps({"graph_key": key, **facts}))


@contextlib.contextmanager
def one_maker(out: Path):
    """One process makes `out` at a time (two servers opening one deployment); the others wait, then find it made
    (callers check is_current again inside). Holding the lock, this process is the only one staging `out` (stage()):
    folders staged by one killed earlier go."""
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in out.parent.glob(f".{out.name}.stage-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def stage(out: Path) -> tempfile.TemporaryDirectory:
    """A folder beside `out` to write it in whole before it is renamed into place (one_maker clears leftovers)."""
    return tempfile.TemporaryDirectory(prefix=f".{out.name}.stage-", dir=out.parent)
