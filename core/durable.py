"""Durable file writes: one way to replace a file so that a crash leaves the old file or the new one, never a
torn one (the manifest, calibration rows, TensorRT engines, the vector index, a migrated store)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, target: str | Path) -> None:
    """os.replace that survives a crash: the data is on disk before the rename, the rename before we return."""
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(Path(target).parent, directory=True)


def write_durably(path: str | Path, data: bytes | str) -> None:
    """Replace the file `path` with `data` so that readers see the old file or the new one, and a crash leaves one
    of them: a temporary file beside it (removed if anything fails), durable_replace. A new file is made 0644
    (mkstemp's 0600 would hide it from other users); an existing one keeps its mode."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
