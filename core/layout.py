"""Host-side batch layout: (tokens, one task per row) -> the graph's inputs.

The graph concatenates [MPT prompt slots (Tm) | input-level prompt slots (P) | tokens (S)], reorders each row
with `order`, and attends over [prefix slots (N) | that sequence] (io_spec.py). This module sizes the three slot
groups for a batch, allocates the feeds and offers the two placements every prompt kind is made of:

- `virtual_in_front`: the row's virtual tokens first (mask 1, token types 0), then its tokens, then every unused
  prompt slot (masked), so the first real element of each row sits at position 0 (what the BERT pooler and
  RoBERTa head read); positions count through the virtual tokens.
- `cache_in_front`: no virtual tokens in the sequence; the row's key/values fill the prefix slots (mask 1).

Which placement a row gets, its tensors and its position rule are the business of its kind (promptmux.kinds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .archs import ArchSpec
from .io_spec import EMPTY_MPT, INPUTS, layout_inputs, zeros


@dataclass
class Layout:
    feeds: dict[str, np.ndarray]
    token_start: np.ndarray  # [B] index of each row's first token in the reordered sequence


class LayoutBuilder:
    """The feeds of one batch while its rows are placed (see promptmux.kinds.base.PromptKind.place)."""

    def __init__(self, spec: ArchSpec, position_offset: int, pad_token_id: int | None, input_ids: np.ndarray,
                 attention_mask: np.ndarray, token_type_ids: np.ndarray | None, dims, slots: dict[str, int],
                 dtype=np.float32):
        self.spec, self.offset, self.pad_token_id, self.dims = spec, position_offset, pad_token_id, dims
        self.input_ids, self.attention_mask, self.token_type_ids = input_ids, attention_mask, token_type_ids
        self.dtype = dtype
        batch, self.seq = input_ids.shape
        self.mpt_slots, self.prompt_slots, self.prefix_slots = slots["mpt"], slots["input"], slots["prefix"]
        self.has_prefix = spec.supports_prefix
        length = self.mpt_slots + self.prompt_slots + self.seq
        sizes = {"batch": batch, "tokens": self.seq, "length": length, "prefix_plus_length": self.prefix_slots + length,
                 "prompt_tokens": self.prompt_slots, "mpt_tokens": self.mpt_slots, "prefix_tokens": self.prefix_slots,
                 **EMPTY_MPT}  # MPT's factor table: one zero entry unless an MPT kind fills it (kinds/mpt.py)
        self.feeds = zeros([n for n in INPUTS if n not in ("input_ids", "logits_index")], dims, sizes, dtype)
        self.feeds["input_ids"] = input_ids.astype(np.int64)
        self.feeds["position_ids"] += position_offset  # every slot's until a placement sets it
        self.token_start = np.zeros((batch,), np.int64)

    def _tokens(self, i: int, t: int, real: list[int], unused: list[int]) -> None:
        length = self.mpt_slots + self.prompt_slots + self.seq
        self.feeds["order"][i] = real + list(range(self.mpt_slots + self.prompt_slots, length)) + unused
        self.token_start[i] = t
        start = self.prefix_slots + t
        self.feeds["attention_mask"][i, start: start + self.seq] = self.attention_mask[i]
        if self.token_type_ids is not None:
            self.feeds["token_type_ids"][i, t: t + self.seq] = self.token_type_ids[i]

    def virtual_in_front(self, i: int, first_slot: int, t: int) -> None:
        """Row i's t virtual tokens are the prompt slots [first_slot, first_slot + t) (MPT slots start at 0,
        input-level slots at Tm); positions run through them: k for virtual token k, t + j for token j."""
        real = list(range(first_slot, first_slot + t))
        unused = list(range(first_slot)) + list(range(first_slot + t, self.mpt_slots + self.prompt_slots))
        self._tokens(i, t, real, unused)
        self.feeds["attention_mask"][i, self.prefix_slots: self.prefix_slots + t] = 1
        self.feeds["position_ids"][i, : t + self.seq] = self.offset + np.arange(t + self.seq)
        if self.spec.positions_follow_mask:  # OPT: padding takes no position; tokens count on after the prompt
            self.feeds["position_ids"][i, t: t + self.seq] = self.offset + t + self.mask_positions(i)

    def mask_positions(self, i: int) -> np.ndarray:
        """Row i's token positions counted over its attention mask (0 for the first real token; a pad repeats
        the position before it, which nothing reads)."""
        return np.maximum(np.cumsum(self.attention_mask[i]) - 1, 0)

    def cache_in_front(self, i: int, kv: np.ndarray, positions: np.ndarray) -> None:
        """Row i attends to kv [layers, 2, kv_heads, n, head_dim] before its tokens; its tokens take `positions`."""
        n = kv.shape[3]
        self.feeds["prefix_keys"][:, i, :, :n] = kv[:, 0]
        self.feeds["prefix_values"][:, i, :, :n] = kv[:, 1]
        self.feeds["attention_mask"][i, :n] = 1
        self._tokens(i, 0, [], list(range(self.mpt_slots + self.prompt_slots)))
        self.feeds["position_ids"][i, : self.seq] = positions

    def layout(self) -> Layout:
        names = layout_inputs(self.spec)
        return Layout(feeds={n: self.feeds[n] for n in names}, token_start=self.token_start)


def build_layout(spec: ArchSpec, position_offset: int, pad_token_id: int | None, input_ids: np.ndarray,
                 attention_mask: np.ndarray, token_type_ids: np.ndarray | None, tasks: list, dims,
                 dtype=np.float32, min_slots: int = 1, prefix: bool | None = None) -> Layout:
    """The feeds for a batch where row i uses tasks[i].

    min_slots: the fewest slots each group gets when no row uses it (the full-sequence graph keeps one masked
    slot; the cached decoder takes zero-length axes). prefix: whether this graph has prefix slots (default: the
    family's; a seq2seq encoder has none, its prefixes go to the decoder)."""
    from promptmux.kinds import kind_of

    if prefix is not None and prefix != spec.supports_prefix:
        from dataclasses import replace

        spec = replace(spec, supports_prefix=prefix)
    kinds = [kind_of(t) for t in tasks]
    need = {"mpt": [], "input": [], "prefix": []}
    for kind, task in zip(kinds, tasks):
        group, count = kind.slots(task, spec.supports_prefix)
        if group:
            need[group].append(count)
    slots = {g: max(c, default=min_slots) for g, c in need.items()}
    if not spec.supports_prefix:
        slots["prefix"] = 0
    builder = LayoutBuilder(spec, position_offset, pad_token_id, input_ids, attention_mask, token_type_ids, dims, slots,
                      dtype)
    by_kind: dict[type, tuple] = {}
    for kind, task in zip(kinds, tasks):
        by_kind.setdefault(type(kind), (kind, []))[1].append(task)
    for kind, group in by_kind.values():
        kind.prepare(group, builder)
    for i, (kind, task) in enumerate(zip(kinds, tasks)):
        kind.place(i, task, builder)
    return builder.layout()


def encoder_layout(spec, pad_token_id, ids: np.ndarray, mask: np.ndarray, tasks: list, dims):
    """The encoder's layout: no prefix slots (key/value prefixes go to the decoder's cache), positions unused."""
    return build_layout(spec, 0, pad_token_id, ids, mask, None, tasks, dims, min_slots=0, prefix=False)
