"""The generator's precomputed prompt key/values: an LRU bounded in bytes, keyed by task and version.

A task's entry is valid while the bank holds the same write of it (same_prompt: its name and the version its
store stamped), so a task replaced by any process is computed again, and nothing hashes the bank.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from promptmux.core.task import Task, same_prompt

DEFAULT_KV_CACHE_BYTES = 512 * 2**20  # Runtime(kv_cache_mb=...), serve --kv-cache-mb


class PromptKVCache:
    def __init__(self, limit_bytes: int = DEFAULT_KV_CACHE_BYTES):
        self.limit = limit_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[Task, np.ndarray]] = OrderedDict()  # most recently used last
        self._lock = threading.Lock()  # the server's worker and admin threads both use it

    def get(self, view: Task) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(view.name)
            if entry is None or not same_prompt(entry[0], view):
                return None
            self._entries.move_to_end(view.name)
            return entry[1]

    def put(self, view: Task, kv: np.ndarray) -> None:
        with self._lock:
            self._drop(view.name)
            self._entries[view.name] = (view, kv)
            self.bytes += kv.nbytes
            while self.bytes > self.limit and len(self._entries) > 1:
                self._drop(next(iter(self._entries)))

    def keep(self, holds) -> None:
        """Drop every entry whose task holds(view) says is gone or replaced."""
        with self._lock:
            for name in [n for n, (view, _) in self._entries.items() if not holds(view)]:
                self._drop(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def full(self) -> bool:
        return self.bytes >= self.limit

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.bytes -= entry[1].nbytes
