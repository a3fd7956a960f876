"""What is sent: random token ids (batches), the task of each request (traffic mixes) and the fixed request
stream of a configuration (Workload), batched in arrival order or grouped by task."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .settings import MIXES


def make_batch(rows: int, seq: int, vocab: int, pad_id: int, seed: int, padded: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids, left padded: row i has (i % 4) pads (row 0 and every 4th row none) if padded."""
    rng = np.random.default_rng(seed)
    low = 5 if vocab > 50 else 1
    ids = rng.integers(low, vocab, size=(rows, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(rows):
        mask[i, : min(i % 4, seq - 1) if padded else 0] = 0
    ids = np.where(mask == 1, ids, pad_id)
    return ids, mask


def zipf_ranks(rng: np.random.Generator, n: int, size, s: float = 1.0) -> np.ndarray:
    """0-based ranks drawn from Zipf(s) truncated to n items: rank k (1-based) with probability k^-s / H(n, s).
    Not numpy's zipf clipped to n: with s near 1 that puts most draws on the last rank (85 % at n = 1,000)."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64) ** s)
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(size), side="right"), n - 1)


def assign_tasks(mix: str, tasks: list[str], n: int, seed: int, zipf_s: float = 1.0) -> list[str]:
    """The task of each of n requests. single: all tasks[0]; uniform: i.i.d. uniform; zipf: rank k ∝ 1/k^s."""
    if not tasks:
        raise ValueError("no tasks to send requests to")
    if mix == "single":
        return [tasks[0]] * n
    rng = np.random.default_rng(seed)
    if mix == "uniform":
        idx = rng.integers(0, len(tasks), size=n)
    elif mix == "zipf":
        idx = zipf_ranks(rng, len(tasks), n, zipf_s)
    else:
        raise ValueError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")
    return [tasks[i] for i in idx]


@dataclass
class Workload:
    """A fixed request stream: row i of ids/mask is request i, sent to tasks[i]."""

    ids: np.ndarray
    mask: np.ndarray
    tasks: list[str]
    batch_size: int
    new_tokens: int

    def __len__(self) -> int:
        return len(self.tasks)

    def batches(self, grouped: bool) -> list[list[int]]:
        """Row indices per batch: arrival order (mixed tasks), or grouped by task first (one task per batch)."""
        b = self.batch_size
        if not grouped:
            return [list(range(i, min(i + b, len(self))) ) for i in range(0, len(self), b)]
        order: dict[str, list[int]] = {}
        for i, t in enumerate(self.tasks):
            order.setdefault(t, []).append(i)
        return [rows[i : i + b] for rows in order.values() for i in range(0, len(rows), b)]

    def tokens(self, rows: list[int]) -> int:
        """Tokens a batch accounts for: generated tokens (N > 0) or its real input tokens."""
        return len(rows) * self.new_tokens if self.new_tokens else int(self.mask[rows].sum())


def make_workload(vocab: int, pad_id: int, n: int, seq: int, tasks: list[str], batch_size: int, new_tokens: int,
                  seed: int) -> Workload:
    ids, mask = make_batch(n, seq, vocab, pad_id, seed=seed, padded=False)
    return Workload(ids, mask, tasks, batch_size, new_tokens)
