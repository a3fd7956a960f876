"""Durable file writes: one way to replace a file so that a crash leaves the old file or the new one, never a
torn one (the manifest, calibration rows, TensorRT engines, the vector index, a migrated store)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_file(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, target: str | Path) -> None:
    """os.replace that survives a crash: the data is on disk before the rename, the rename before we return."""
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_file(Path(target).parent, directory=True)


def write_durably(path: str | Path, data: bytes | str) -> None:
    """Replace the file `path` with `data` so that readers see the old file or the new one, and a crash leaves one
    of them: a temporary file beside it (removed if anything fails), durable_replace. A new file gets a plain
    open()'s mode, 0666 less the umask (mkstemp's 0600 would hide it from other users); an existing one keeps its."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_onnx(model, path: str | Path, data_name: str, size_threshold: int = 1024) -> None:
    """onnx.save_model with every initializer of at least size_threshold bytes in one external file `data_name`
    beside `path`. onnx's own save_as_external_data refuses when a file of that name exists in the *current*
    folder (it tests the bare name), so an export run from inside a deployment failed: the tensors are marked here
    and written by save_model relative to the graph's folder."""
    import sys

    import onnx
    from onnx import external_data_helper as ext

    target = Path(path).with_name(data_name)
    target.unlink(missing_ok=True)  # save_model appends to an existing data file
    for tensor in ext._get_initializer_tensors(model):
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= size_threshold:
            ext.set_external_data(tensor, data_name)
    onnx.save_model(model, str(path))


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads' file creation)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def as_created(path: str | Path) -> None:
    """Give a file or folder the mode a plain open() or mkdir() would have (0666 or 0777 less the umask): onnx writes
    external weights 0600 and a private temporary folder is 0700, which would hide a deployment from a server
    running as another user."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def as_created_tree(folder: str | Path) -> None:
    """as_created for a folder made private while it was written (mkdtemp, mode 0700) and everything in it."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            as_created(path)
