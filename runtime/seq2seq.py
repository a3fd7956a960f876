"""Generation for prompt-tuned seq2seq models (T5 family): encode once, then cached decoder steps.

Each row's prompt goes where PEFT's generate puts it (export/seq2seq.py): input-level and MPT
prompts in front of the encoder input, prefix-tuning prefixes as the decoder's first cache
entries. The encoder graph returns every decoder layer's cross-attention keys/values, so the
decoder steps never see the encoder states again.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from promptmux.core.bank import TaskView
from .generate import SamplingParams, _pick, eos_ids
from .layout import build_layout


def encoder_layout(spec, pad_token_id, ids: np.ndarray, mask: np.ndarray, views: list[TaskView], dims):
    """The encoder's layout: prefix rows have no virtual tokens on the encoder side."""
    d = dims.hidden_size
    enc_views = [TaskView(name=v.name, kind="prompt", peft_type=v.peft_type, num_virtual_tokens=0,
                          prompt=np.zeros((0, d), np.float32)) if v.kind == "prefix" else v for v in views]
    return build_layout(dataclasses.replace(spec, supports_prefix=False), 0, pad_token_id, ids, mask, None,
                        enc_views, dims, min_slots=0)


def decoder_prefix(views: list[TaskView], layers: int, heads: int, head_dim: int):
    """Initial self-attention cache and mask: prefixes right-aligned, masked slots in front (see export/seq2seq.py)."""
    batch = len(views)
    n_max = max([v.num_virtual_tokens for v in views if v.kind == "prefix"], default=0)
    keys = np.zeros((layers, batch, heads, n_max, head_dim), np.float32)
    values = np.zeros_like(keys)
    mask = np.zeros((batch, n_max), np.int64)
    for i, v in enumerate(views):
        if v.kind == "prefix":
            n = v.num_virtual_tokens
            keys[:, i, :, n_max - n:] = v.prefix[:, 0]
            values[:, i, :, n_max - n:] = v.prefix[:, 1]
            mask[i, n_max - n:] = 1
    return keys, values, mask


class Seq2SeqGenerator:
    def __init__(self, runtime, encoder_session, decoder_session):
        from promptmux.export.seq2seq import cross_names, self_names

        self.rt = runtime
        self.encoder = encoder_session
        self.decoder = decoder_session
        cfg = runtime.config
        self.layers = int(getattr(cfg, "num_decoder_layers", None) or cfg.num_layers)
        self.self_names = self_names(self.layers)
        self.cross_names = cross_names(self.layers)
        start = getattr(cfg, "decoder_start_token_id", None)
        self.start_token = start if start is not None else cfg.pad_token_id

    def _eos(self, params: SamplingParams) -> np.ndarray:
        return eos_ids(params, self.rt.config)

    def stream(self, ids: np.ndarray, mask: np.ndarray, views: list[TaskView], params: SamplingParams,
               precompute: bool = True) -> Iterator[np.ndarray]:
        """Yield the next token of every row ([B] int64) once per decoding step. `precompute` has nothing to
        cache here: prompts sit in the (bidirectional) encoder and prefixes already are keys/values."""
        rt = self.rt
        batch = ids.shape[0]
        lay = encoder_layout(rt.spec, rt.config.pad_token_id, ids, mask, views, rt.dims)
        cross = self.encoder.run_all(lay.feeds)
        enc_mask = lay.feeds["attention_mask"]
        keys, values, dec_mask = decoder_prefix(views, self.layers, rt.dims.num_heads, rt.dims.head_dim)
        past = {}
        for i in range(self.layers):
            past[self.self_names[2 * i]] = np.ascontiguousarray(keys[i])
            past[self.self_names[2 * i + 1]] = np.ascontiguousarray(values[i])
        cross_feeds = dict(zip(self.cross_names, cross))
        token = np.full(batch, self.start_token, np.int64)
        rng = np.random.default_rng(params.seed)
        eos = self._eos(params)
        done = np.zeros(batch, bool)
        pad = rt.config.pad_token_id if rt.config.pad_token_id is not None else 0
        for step in range(params.max_new_tokens):
            dec_mask = np.concatenate([dec_mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"input_ids": token[:, None], "attention_mask": dec_mask, "encoder_attention_mask": enc_mask,
                     **past, **cross_feeds}
            out = self.decoder.run_all(feeds)
            logits = out[0]
            past = dict(zip(self.self_names, out[1:]))
            token = np.where(done, pad, _pick(logits, params, rng)).astype(np.int64)
            yield token
            done |= np.isin(token, eos)
            if done.all():
                return
