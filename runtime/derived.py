"""Files derived from a deployment's graph (OpenVINO IR, the int8 decoder): made once, reused while the graph is
unchanged. A JSON stamp beside each records the identity of the graph it was made from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def graph_key(path: Path) -> str:
    """Identity of a graph file and its weights (name, size, mtime): a re-export gives another key."""
    h = hashlib.sha256()
    for f in (path, path.with_name(path.name + ".data")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


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
