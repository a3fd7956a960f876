"""Input-level prompts as task embeddings: which prompts compare, their similarity, resampling and sums.

Which prompts are task embeddings
---------------------------------
Input-level prompts live in the model's token-embedding space and are comparable with each other:
prompt tuning and P-tuning (the bank holds P-tuning's encoder *output*, [T, d]) and MPT tasks (their
composed prompt shared * (cols @ rows), [T, d]). Prefix tuning's prompts are per-layer attention
keys/values, another space altogether, so prefix tasks are left out of rankings (listed as skipped)
and a prefix query or source is refused with a message saying so.

Similarity of prompts of different lengths
------------------------------------------
* ``avg-cosine`` (SPoT's "average cosine"): cosine of the two prompts' mean tokens. The mean removes
  the length, so prompts of any lengths compare directly.
* ``per-token-cosine`` (SPoT's "per-token average cosine"): the mean cosine over *all* token pairs
  (i of the query, j of the source), (1 / (T_q T_s)) sum_ij cos(q_i, s_j). Every pair counts once, so
  this too is defined for any two lengths without aligning or resampling tokens.

Combining prompts of different lengths (``weighted``)
------------------------------------------------------
A weighted top-k initialisation is sum_i w_i * P_i with w_i = max(score_i, 0) / sum_j max(score_j, 0)
(uniform when no score is positive). Sources whose length differs from the target's number of
virtual tokens (default: the best source's length) are first resampled to it along the token axis
by linear interpolation (token j of the target sits at position j (T_s - 1) / (T - 1) of the source);
a source of the target length is used as it is.
"""

from __future__ import annotations

import numpy as np

from promptmux.kinds import get as get_kind
from promptmux.kinds import kind_of

METHODS = ("avg-cosine", "per-token-cosine")


class LibraryError(ValueError):
    """A retrieval or initialisation request cannot be carried out; the message says why."""


def is_input_level(kind: str) -> bool:
    """Whether a bank kind's prompt lives in the token-embedding space (so it can be ranked or initialise one)."""
    return get_kind(kind).input_level


def task_prompt(view) -> np.ndarray:
    """The input-level prompt [T, d] of a bank task (MPT tasks composed, as PEFT composes them).

    Raises LibraryError for key/value prefixes (prefix tuning, CARTRIDGE), which are not input-level tokens.
    """
    prompt = kind_of(view).input_prompt(view)
    if prompt is None:
        raise LibraryError(
            f"task {view.name!r} is {view.peft_type}: its prompt is per-layer attention keys/values (prefix tuning "
            "style), not input-level virtual tokens, so it cannot be compared with (or initialise) input-level prompts")
    return np.asarray(prompt, dtype=np.float32)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise LibraryError(f"unknown similarity method {method!r}; use one of {', '.join(METHODS)}")


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def prompt_similarity(a: np.ndarray, b: np.ndarray, method: str = "avg-cosine") -> float:
    """Similarity of two input-level prompts [Ta, d] and [Tb, d] (any lengths; see the module doc)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise LibraryError(f"prompts of shapes {a.shape} and {b.shape} cannot be compared: need [T, d] with one d")
    check_method(method)
    if method == "avg-cosine":
        return float(_unit(a.mean(0)) @ _unit(b.mean(0)))
    return float((_unit(a) @ _unit(b).T).mean())  # per-token-cosine


def resample_tokens(prompt: np.ndarray, length: int) -> np.ndarray:
    """Resample a prompt [T, d] to `length` tokens by linear interpolation along the token axis.

    The same length returns the prompt unchanged (bit for bit); one source token is repeated.
    """
    prompt = np.asarray(prompt)
    t = prompt.shape[0]
    if length < 1:
        raise LibraryError(f"number of virtual tokens must be at least 1, got {length}")
    if t == length:
        return prompt
    if t == 1:
        return np.repeat(prompt, length, axis=0)
    pos = np.linspace(0.0, t - 1, length) if length > 1 else np.zeros(1)
    lo = np.floor(pos).astype(int).clip(0, t - 1)
    hi = np.minimum(lo + 1, t - 1)
    frac = (pos - lo)[:, None]
    p = prompt.astype(np.float64)
    return ((1.0 - frac) * p[lo] + frac * p[hi]).astype(prompt.dtype)


def score_weights(scores: list[float]) -> list[float]:
    """w_i = max(score_i, 0) / sum_j max(score_j, 0); uniform when no score is positive."""
    pos = [max(s, 0.0) for s in scores]
    total = sum(pos)
    return [p / total for p in pos] if total > 0 else [1.0 / len(scores)] * len(scores)


def combine_prompts(prompts: list[np.ndarray], weights: list[float], length: int) -> np.ndarray:
    """sum_i w_i * resample(P_i, length), accumulated in float64, returned as float32."""
    acc = np.zeros((length, prompts[0].shape[1]), dtype=np.float64)
    for p, w in zip(prompts, weights):
        acc += w * resample_tokens(p, length).astype(np.float64)
    return acc.astype(np.float32)


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_i w_i * A_i as float32; one array of weight 1 is returned as it is."""
    if len(arrays) == 1 and weights[0] == 1.0:
        return np.asarray(arrays[0], dtype=np.float32)
    if len(set(weights)) == 1:  # uniform: the plain mean, as PEFT's AVERAGE_SOURCE_TASKS computes it
        import torch

        return torch.from_numpy(np.stack(arrays).astype(np.float32)).mean(0).numpy()
    acc = np.zeros_like(arrays[0], dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += w * a.astype(np.float64)
    return acc.astype(np.float32)
