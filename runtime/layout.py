"""Host-side batch layout: turn (tokens, per-row tasks) into the graph's inputs.

The graph concatenates [MPT prompt slots (Tm) | input-level prompt slots (P) | tokens (S)] and
reorders each row with `order`. Here we choose, per row, which slots are real and what the
mask, position ids and token type ids are, following PEFT's forward for that row's kind:

- prompt / P-tuning / MPT: virtual tokens in front, mask 1, token types 0; positions count
  through the virtual tokens (k for virtual token k, T + j for token j), as the model does
  when PEFT drops position_ids and passes inputs_embeds.
- prefix tuning: no virtual tokens in the sequence; the prefix is the cache (mask 1), so
  positions start at n (PEFT passes input_ids, so RoBERTa derives them from non-pad ids).

Unused slots are masked and placed after the row's tokens, so the first real element of each
row sits at position 0 (what the BERT pooler and RoBERTa head read).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptmux.core.archs import ArchSpec


@dataclass
class Layout:
    feeds: dict[str, np.ndarray]
    token_start: np.ndarray  # [B] index of each row's first token in the reordered sequence


def build_layout(
    spec: ArchSpec,
    position_offset: int,
    pad_token_id: int | None,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None,
    prompts: list,  # per row: the bank's TaskView
    dims,
    dtype=np.float32,
    min_slots: int = 1,
) -> Layout:
    """min_slots: the fewest prompt/MPT/prefix slots a batch gets even when no row uses that kind
    (the full-sequence graph keeps one masked slot; the cached decoder takes zero-length axes)."""
    batch, seq = input_ids.shape
    d = dims.hidden_size

    # Distinct MPT tasks of this batch get a small local factor table.
    mpt_rows = [p for p in prompts if p.kind == "mpt"]
    mpt_index: dict[str, int] = {}
    shared_index: dict[int, int] = {}
    shared_list, cols_list, rows_list, shared_ids = [], [], [], []
    for p in mpt_rows:
        if p.name in mpt_index:
            continue
        mpt_index[p.name] = len(cols_list)
        key = id(p.shared)
        if key not in shared_index:
            shared_index[key] = len(shared_list)
            shared_list.append(p.shared)
        shared_ids.append(shared_index[key])
        cols_list.append(p.cols)
        rows_list.append(p.rows)
    tm = max([s.shape[0] for s in shared_list], default=min_slots)
    rank = max([c.shape[1] for c in cols_list], default=1)
    mpt_shared = np.zeros((max(len(shared_list), 1), tm, d), dtype)
    mpt_cols = np.zeros((max(len(cols_list), 1), tm, rank), dtype)
    mpt_rows_t = np.zeros((max(len(rows_list), 1), rank, d), dtype)
    for i, s in enumerate(shared_list):
        mpt_shared[i, : s.shape[0]] = s
    for i, (c, r) in enumerate(zip(cols_list, rows_list)):
        mpt_cols[i, : c.shape[0], : c.shape[1]] = c
        mpt_rows_t[i, : r.shape[0]] = r

    p_len = max([p.num_virtual_tokens for p in prompts if p.kind == "prompt"], default=min_slots)
    # Prefix slots in front of the mask; families whose attention takes no cache have none.
    n_len = max([p.num_virtual_tokens for p in prompts if p.kind == "prefix"], default=min_slots) if spec.supports_prefix else 0
    length = tm + p_len + seq

    prompt_embeds = np.zeros((batch, p_len, d), dtype)
    mpt_task_ids = np.zeros((batch,), np.int64)
    prefix_keys = np.zeros((dims.num_layers, batch, dims.num_kv_heads, n_len, dims.head_dim), dtype)
    prefix_values = np.zeros_like(prefix_keys)
    order = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, n_len + length), np.int64)
    positions = np.full((batch, length), position_offset, np.int64)
    types = np.zeros((batch, length), np.int64)
    token_start = np.zeros((batch,), np.int64)

    for i, p in enumerate(prompts):
        if p.kind == "prompt":
            t = p.num_virtual_tokens
            prompt_embeds[i, :t] = p.prompt
            real = list(range(tm, tm + t))
            unused = list(range(tm)) + list(range(tm + t, tm + p_len))
        elif p.kind == "mpt":
            t = p.shared.shape[0]
            mpt_task_ids[i] = mpt_index[p.name]
            real = list(range(t))
            unused = list(range(t, tm + p_len))
        else:  # prefix
            t = 0
            n = p.num_virtual_tokens
            prefix_keys[:, i, :, :n] = p.prefix[:, 0]
            prefix_values[:, i, :, :n] = p.prefix[:, 1]
            mask[i, :n] = 1
            real = []
            unused = list(range(tm + p_len))
        token_slots = list(range(tm + p_len, length))
        order[i] = real + token_slots + unused
        token_start[i] = t
        mask[i, n_len : n_len + t] = 1
        mask[i, n_len + t : n_len + t + seq] = attention_mask[i]
        positions[i, :t] = position_offset + np.arange(t)
        if p.kind == "prefix":
            n = p.num_virtual_tokens
            if spec.prefix_positions == "roberta":
                # RobertaEmbeddings.create_position_ids_from_input_ids with past length n.
                nonpad = (input_ids[i] != pad_token_id).astype(np.int64)
                positions[i, :seq] = (np.cumsum(nonpad) + n) * nonpad + pad_token_id
            else:
                positions[i, :seq] = position_offset + n + np.arange(seq)
        else:
            positions[i, t : t + seq] = position_offset + t + np.arange(seq)
        if token_type_ids is not None:
            types[i, t : t + seq] = token_type_ids[i]

    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": mask,
        "position_ids": positions,
        "order": order,
        "prompt_embeds": prompt_embeds,
        "mpt_task_ids": mpt_task_ids,
        "mpt_shared_ids": np.asarray(shared_ids or [0], np.int64),
        "mpt_shared": mpt_shared,
        "mpt_cols": mpt_cols,
        "mpt_rows": mpt_rows_t,
    }
    if spec.supports_prefix:
        feeds["prefix_keys"], feeds["prefix_values"] = prefix_keys, prefix_values
    if spec.token_types:
        feeds["token_type_ids"] = types
    return Layout(feeds=feeds, token_start=token_start)
