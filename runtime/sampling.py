"""A request's sampling settings (checked, with a message that says what to give) and the next token per row."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings (text in/out only)
    eos_token_id: int | Sequence[int] | None = None  # None: the model's

    def check(self, max_positions: int | None) -> None:
        """Refuse settings that cannot run, saying what to give (numpy's integers and floats are numbers too)."""
        def number(x, kind=numbers.Real) -> bool:
            return isinstance(x, kind) and not isinstance(x, bool)

        if not number(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.max_new_tokens = int(self.max_new_tokens)
        if max_positions and self.max_new_tokens > max_positions:
            raise InputError(
                f"max_new_tokens={self.max_new_tokens} exceeds the model's {max_positions} positions")
        if not number(self.temperature) or not 0 < self.temperature < float("inf"):
            raise InputError(f"temperature must be > 0 and finite, got {self.temperature!r}")
        if not number(self.top_k, numbers.Integral) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not number(self.seed, numbers.Integral) or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0 (or None), got {self.seed!r}")
        eos = self.eos_token_id
        if eos is not None and not all(number(e, numbers.Integral) for e in np.atleast_1d(np.asarray(eos, object))):
            raise InputError(f"eos_token_id must be a token id or a list of them ([]: none), got {eos!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"a stop string must be a non-empty string, got {list(self.stop)!r}")


def pick(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax, or a sample after temperature, top-k and top-p. Never NaN, whatever the
    parameters: the most likely token always keeps a probability of 1 before normalization."""
    if not p.do_sample:
        return logits.argmax(-1)
    x = logits.astype(np.float64)
    # Shift before scaling: the best token sits at exactly 0 and every other at -something (or -inf when a
    # tiny temperature overflows), so exp() below is 1 for the best token and the sum is never 0 or inf.
    with np.errstate(over="ignore"):
        x = (x - x.max(-1, keepdims=True)) / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = np.partition(x, -p.top_k, axis=-1)[:, -p.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x)
    probs /= probs.sum(-1, keepdims=True)
    if p.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p, and always the most likely token (a top_p below
        # its probability would otherwise drop every token); the tolerance stops rounding in the softmax
        # from admitting one token too many
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= p.top_p - 1e-6
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])
