"""Generation for prompt-tuned seq2seq models (T5, BART families): encode once, then cached decoder steps.

Each row's prompt goes where PEFT's generate puts it (export/seq2seq_export.py): input-level and MPT
prompts in front of the encoder input, prefix-tuning prefixes as the decoder's first cache
entries. The encoder graph returns every decoder layer's cross-attention keys/values, so the
decoder steps never see the encoder states again.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from promptmux.core.archs import decoder_sizes, pad_id
from promptmux.core.layout import encoder_layout
from promptmux.core.task import Task
from promptmux.kinds import kind_of

from .generate import RuntimeBound, SamplingParams, ended_rows_kept, eos_ids, pick
from .sessions import host
from .text import generation_defaults


def decoder_prefix(views: list[Task], layers: int, heads: int, head_dim: int):
    """Initial self-attention cache and mask: prefixes right-aligned, masked slots in front (see export/seq2seq_export.py)."""
    batch = len(views)
    kvs = [kind_of(v).kv_prefix(v) for v in views]
    n_max = max([kv.shape[3] for kv in kvs if kv is not None], default=0)
    keys = np.zeros((layers, batch, heads, n_max, head_dim), np.float32)
    values = np.zeros_like(keys)
    mask = np.zeros((batch, n_max), np.int64)
    for i, kv in enumerate(kvs):
        if kv is not None:
            n = kv.shape[3]
            keys[:, i, :, n_max - n:] = kv[:, 0]
            values[:, i, :, n_max - n:] = kv[:, 1]
            mask[i, n_max - n:] = 1
    return keys, values, mask


def decoder_too_long(view: Task, new_tokens: int, limit: int | None, new_name: str = "max_new_tokens") -> str | None:
    """Why a row's decoder does not fit `limit` positions, or None: a prefix-tuning prefix takes the decoder's first
    positions (its first cache entries), and the tokens generated come after it."""
    kv = kind_of(view).kv_prefix(view)
    n = 0 if kv is None else int(kv.shape[3])
    if not limit or n + new_tokens <= limit:
        return None
    return (f"the {n} decoder prefix positions of task {view.name!r} + {new_name}={new_tokens} exceed the model's "
            f"{limit} positions")


class Seq2SeqGenerator(RuntimeBound):
    def __init__(self, runtime, encoder_session, decoder_session):
        from promptmux.core.seq2seq_graph import cross_names, self_names

        super().__init__(runtime)
        self.encoder = encoder_session
        self.decoder = decoder_session
        cfg = runtime.config
        self.layers, self.heads, self.head_dim = decoder_sizes(cfg)
        self.self_names = self_names(self.layers)
        self.cross_names = cross_names(self.layers)
        start = getattr(cfg, "decoder_start_token_id", None)
        self.start_token = start if start is not None else cfg.pad_token_id
        # The first and last new tokens transformers' generate forces (BART's generation config: EOS last).
        gen = generation_config(runtime.dir)
        self.forced_first, self.forced_last = gen.forced_bos_token_id, gen.forced_eos_token_id
        self.model_eos = generation_defaults(runtime.dir, cfg)  # and BART's num_beams, min_length... named

    def eos_for(self, params: SamplingParams) -> np.ndarray:
        return eos_ids(params, self.model_eos)

    def stream(self, ids: np.ndarray, mask: np.ndarray, views: list[Task], params: SamplingParams,
               precompute: bool = True, own_positions: bool = False,
               done: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row ([B] int64) once per decoding step. `precompute` has nothing to
        cache here: prompts sit in the (bidirectional) encoder and prefixes already are keys/values; nor has
        `own_positions`: the encoder's positions never count a row's padding. done: as Generator.stream's (rows
        the caller ends leave the decoder's batch)."""
        rt = self.rt
        batch = ids.shape[0]
        lay = encoder_layout(rt.spec, rt.config.pad_token_id, ids, mask, views, rt.dims)
        cross = self.encoder.run_all(lay.feeds)
        enc_mask = lay.feeds["attention_mask"]
        keys, values, dec_mask = decoder_prefix(views, self.layers, self.heads, self.head_dim)
        past = {}
        for i in range(self.layers):
            past[self.self_names[2 * i]] = np.ascontiguousarray(keys[i])
            past[self.self_names[2 * i + 1]] = np.ascontiguousarray(values[i])
        cross_feeds = dict(zip(self.cross_names, cross))
        token = np.full(batch, self.start_token, np.int64)
        rng = np.random.default_rng(params.seed)
        eos = self.eos_for(params)
        done = np.zeros(batch, bool) if done is None else done
        pad = pad_id(rt.config)
        running = np.arange(batch)  # the rows in the decoder's batch
        logits = None
        for step in range(params.max_new_tokens):
            keep = np.flatnonzero(~done[running])
            if len(keep) < len(running):  # ended rows leave the batch (their caches with them)
                running = running[keep]
                dec_mask, enc_mask = dec_mask[keep], enc_mask[keep]
                past = {k: host(v)[keep] for k, v in past.items()}
                cross_feeds = {k: host(v)[keep] for k, v in cross_feeds.items()}
            dec_mask = np.concatenate([dec_mask, np.ones((len(running), 1), np.int64)], axis=1)
            feeds = {"input_ids": token[running, None], "attention_mask": dec_mask, "encoder_attention_mask": enc_mask,
                     **past, **cross_feeds}
            out = self.decoder.run_all(feeds)
            # an ended row keeps its last logits: the shared rng draws as many numbers whichever rows ended
            logits = host(out[0]) if logits is None else ended_rows_kept(logits, running, host(out[0]))
            past = dict(zip(self.self_names, out[1:]))
            token = pick(logits, params, rng)
            forced = self.forced_first if step == 0 else None
            if step == params.max_new_tokens - 1 and self.forced_last is not None:
                forced = self.forced_last
            if forced is not None:
                token = np.full(batch, forced, np.int64)
            token = np.where(done, pad, token).astype(np.int64)
            yield token
            done |= np.isin(token, eos)
            if done.all():
                return


def generation_config(folder):
    """The deployment's generation config (copied from the base model at export), else the one transformers derives
    from the model config."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except OSError:
        from promptmux.core.folder import load_base_config  # the transformers config, not the runtime's LightConfig

        return GenerationConfig.from_model_config(load_base_config(folder))
