"""What the store's vectors table holds for a task whose prompt is input-level (core/bank.py writes it, retrieval
reads it): two unit-scale float16 summaries of its prompt, whose dot products with a query's are the similarities."""

from __future__ import annotations

import numpy as np

from .task import Task


def prompt_summaries(prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit mean of the rows, mean of the unit rows) of a prompt [T, d]: a query's dot product with them is the
    avg-cosine and the per-token-cosine similarity (library/prompts.py) exactly."""
    p = np.asarray(prompt, np.float64)
    mean = p.mean(0)
    rows = p / np.where((n := np.linalg.norm(p, axis=1, keepdims=True)) == 0, 1.0, n)
    return mean / (np.linalg.norm(mean) or 1.0), rows.mean(0)


def summaries(task: Task) -> tuple[bytes, bytes] | None:
    from promptmux.kinds import kind_of

    prompt = kind_of(task).input_prompt(task)
    if prompt is None:
        return None
    return tuple(v.astype(np.float16).tobytes() for v in prompt_summaries(prompt))
