"""Cached generation for prompt-tuned causal LMs, with a task per row.

One graph (`decoder.onnx`, see export/graph.py PromptedDecoder) runs the prefill and every
decoding step. Two prefill strategies give the same tokens:

- precomputed prompt KV (default): each task's virtual tokens sit in front of the input in a
  causal model, so their per-layer keys/values never depend on the text. They are computed once
  per task (prefix tuning's prefixes already are keys/values) and the prefill runs only the real
  tokens with that KV as the past.
- inline prompts: the prefill runs the virtual tokens with the text, as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .bank import TaskView
from .errors import InputError
from .layout import build_layout
from .sessions import host


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
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if max_positions and self.max_new_tokens > max_positions:
            raise InputError(
                f"max_new_tokens={self.max_new_tokens} exceeds the model's {max_positions} positions")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")


def _pick(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax, or a sample after temperature, top-k and top-p."""
    if not p.do_sample:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = np.partition(x, -p.top_k, axis=-1)[:, -p.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if p.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token);
        # the tolerance stops rounding in the softmax from admitting one token too many
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= p.top_p - 1e-6
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class KVPrefix(TaskView):
    """A task seen through its precomputed keys/values: a prefix of length num_virtual_tokens."""


class Generator:
    """Runs generation over a Runtime's decoder session and prompt bank."""

    def __init__(self, runtime, session):
        self.rt = runtime
        self.session = session
        self.layers = runtime.dims.num_layers
        from promptmux.export.archs import position_offset

        self._offset = position_offset(runtime.config)
        self._kv: dict[tuple[str, str], np.ndarray] = {}

    # ---- prompt key/values ----------------------------------------------------------------
    def precompute(self, names) -> None:
        """Compute the prompt key/values of these tasks now (the runtime calls this when tasks are loaded)."""
        bank = self.rt.bank
        for name in names:
            self.prompt_kv(bank.view(name))
        live = {(n, bank.digest(n)) for n in bank.names()}
        for key in [k for k in self._kv if k not in live]:  # removed or replaced tasks
            del self._kv[key]

    def prompt_kv(self, view: TaskView) -> np.ndarray:
        """The task's per-layer keys/values [layers, 2, kv_heads, T, head_dim], computed once per task."""
        if view.kind == "prefix":
            return view.prefix
        key = (view.name, self.rt.bank.digest(view.name))
        if key not in self._kv:
            empty = np.zeros((1, 0), np.int64)
            lay = self._layout(empty, empty, [view])
            _, presents = self._run(lay.feeds, np.zeros(1, np.int64))
            kv = np.stack([np.stack([host(presents[2 * i])[0], host(presents[2 * i + 1])[0]])
                           for i in range(self.layers)])
            self._kv[key] = kv
        return self._kv[key]

    def _layout(self, ids, mask, views):
        rt = self.rt
        from promptmux.export.archs import position_offset

        return build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None, views,
                            rt.dims, min_slots=0)

    def _run(self, feeds: dict[str, np.ndarray], logits_index: np.ndarray):
        feeds = dict(feeds, logits_index=logits_index.astype(np.int64))
        keys, values = feeds.pop("prefix_keys"), feeds.pop("prefix_values")
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(keys[i])
            feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(values[i])
        out = self.session.run_all(feeds)
        return out[0], out[1:]

    # ---- generation -----------------------------------------------------------------------
    def stream(self, ids: np.ndarray, mask: np.ndarray, views: list[TaskView], params: SamplingParams,
               precompute: bool = True) -> Iterator[np.ndarray]:
        """Yield the next token of every row ([B] int64) once per decoding step."""
        batch, seq = ids.shape
        prefix_rows = [i for i, v in enumerate(views) if v.kind == "prefix"]
        if precompute:
            views = [self._as_prefix(v) for v in views]
        lay = self._layout(ids, mask, views)
        # In generate, transformers derives position ids from the attention mask (cumsum - 1) and PEFT shifts
        # them by n for prefix tuning; other kinds drop them, so positions count every slot (the layout's rule).
        positions = lay.feeds["position_ids"]
        for i in prefix_rows:
            n, start = views[i].num_virtual_tokens, lay.token_start[i]
            from_mask = np.where(mask[i] == 1, np.cumsum(mask[i]) - 1, 1)
            positions[i, start:start + seq] = n + from_mask + self._offset
        # Index of each row's last real token in the reordered sequence.
        last_token = np.array([np.flatnonzero(m)[-1] for m in mask])
        logits, presents = self._run(lay.feeds, lay.token_start + last_token)
        cache_mask = lay.feeds["attention_mask"]
        # Positions continue after the last real token of each row.
        next_pos = lay.feeds["position_ids"][np.arange(batch), lay.token_start + last_token] + 1
        rng = np.random.default_rng(params.seed)
        eos = self._eos(params)
        done = np.zeros(batch, bool)
        pad = self.rt.config.pad_token_id if self.rt.config.pad_token_id is not None else 0
        for step in range(params.max_new_tokens):
            token = _pick(logits, params, rng)
            token = np.where(done, pad, token)
            yield token
            done |= np.isin(token, eos)
            if done.all() or step + 1 == params.max_new_tokens:
                return
            cache_mask = np.concatenate([cache_mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {
                "input_ids": token[:, None].astype(np.int64),
                "attention_mask": cache_mask,
                "position_ids": next_pos[:, None].astype(np.int64),
                "order": np.zeros((batch, 1), np.int64),
                "prompt_embeds": np.zeros((batch, 0, self.rt.dims.hidden_size), np.float32),
                "mpt_task_ids": np.zeros(batch, np.int64),
                "mpt_shared_ids": np.zeros(1, np.int64),
                "mpt_shared": np.zeros((1, 0, self.rt.dims.hidden_size), np.float32),
                "mpt_cols": np.zeros((1, 0, 1), np.float32),
                "mpt_rows": np.zeros((1, 1, self.rt.dims.hidden_size), np.float32),
                "logits_index": np.zeros(batch, np.int64),
            }
            for i in range(self.layers):
                feeds[f"past_key_values.{i}.key"] = presents[2 * i]
                feeds[f"past_key_values.{i}.value"] = presents[2 * i + 1]
            out = self.session.run_all(feeds)
            logits, presents = out[0], out[1:]
            next_pos = next_pos + 1

    def _as_prefix(self, view: TaskView) -> TaskView:
        if view.kind == "prefix":
            return view
        kv = self.prompt_kv(view)
        return KVPrefix(name=view.name, kind="prefix", peft_type=view.peft_type,
                        num_virtual_tokens=kv.shape[3], prefix=kv)

    def _eos(self, params: SamplingParams) -> np.ndarray:
        return eos_ids(params, self.rt.config)


def eos_ids(params: SamplingParams, config) -> np.ndarray:
    """The token ids that end a row: the request's, else the model's (none: generate to max_new_tokens)."""
    eos = params.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return np.array([], np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))
