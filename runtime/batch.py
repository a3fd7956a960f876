"""The batch helpers of `Runtime`: padding rows into a batch, splitting rows into batches that fit the positions,
the per-task classification heads, and a session made on first use."""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
from promptmux.core.task import Task

from .errors import InputError


def activation(x: np.ndarray, name: str | None) -> np.ndarray:
    if name is None:
        return x
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(f"unknown head activation {name!r}")


def apply_head(view: Task, features: np.ndarray) -> np.ndarray:
    """The task's classification head (a few small linear layers) on backbone features [n, d]."""
    x = features.astype(np.float32)
    for weight, bias, act in view.layers:
        x = x @ weight.T
        if bias is not None:
            x = x + bias
        x = activation(x, act)
    return x


def pad_rows(rows: list[dict], pad_id: int, side: str) -> dict[str, np.ndarray]:
    """One batch from rows of different lengths, as the tokenizer pads (ids with pad_id, mask and type ids 0)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        padded = [[fill] * (width - len(r[key])) for r in rows]
        out[key] = np.array([p + list(r[key]) if side == "left" else list(r[key]) + p for r, p in zip(rows, padded)],
                            dtype=np.int64)
    return out


class OnFirstUse:
    """A session made when it is first used: a causal LM's full-sequence graph (forward(), full-sequence
    benchmarks) is not loaded, converted or compiled by a process that only generates."""

    def __init__(self, make):
        self._make, self._session, self._lock = make, None, threading.Lock()

    def __getattr__(self, name):  # only for what the session has (run, run_all, input_names, ...)
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._make()
        return getattr(self._session, name)


def task_names(tasks: str | Sequence[str], rows: int) -> list[str]:
    """One task for every row, or one per row."""
    names = [tasks] * rows if isinstance(tasks, str) else list(tasks)
    if len(names) != rows:
        raise InputError(f"got {len(names)} task names for {rows} texts; give one task, or one per text")
    return names


def fitting_groups(lengths: list[int], virtual: list[int], limit: int | None) -> list[list[int]]:
    """Rows in order, split into batches whose padded width plus each row's virtual tokens fits limit."""
    groups: list[list[int]] = []
    width = most_virtual = 0
    for i, (n, v) in enumerate(zip(lengths, virtual)):
        if groups and (not limit or max(width, n) + max(most_virtual, v) <= limit):
            groups[-1].append(i)
            width, most_virtual = max(width, n), max(most_virtual, v)
        else:
            groups.append([i])
            width, most_virtual = n, v
    return groups
