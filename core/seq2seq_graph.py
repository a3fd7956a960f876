"""The seq2seq (T5-family) computation shared by the export and the torch backend: the encoder with the prompts
as inputs (its outputs: every decoder layer's cross-attention keys/values) and one cached decoder step, written
with the model's own modules (gpt-fast style) so the cache is plain tensors. Where each kind's prompt goes is
described in export/seq2seq.py."""

from __future__ import annotations

import torch
from torch import nn

from .graph import PromptedBackbone

DECODER_STEP_INPUTS = ("input_ids", "attention_mask", "encoder_attention_mask")


def cross_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.encoder.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def self_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.decoder.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*dk] -> [B, H, S, dk]"""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _attend(q, k, v, bias, out: nn.Linear) -> torch.Tensor:
    """T5 attention: no 1/sqrt(d) scaling; bias carries the position bias and the mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    ctx = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
    b, h, s, dk = ctx.shape
    return out(ctx.transpose(1, 2).reshape(b, s, h * dk))


class PromptedEncoder(PromptedBackbone):
    """The encoder with input-level and MPT prompts in front; outputs every decoder layer's cross-attention K/V."""

    def forward(self, input_ids, attention_mask, order, prompt_embeds, mpt_task_ids, mpt_shared_ids, mpt_shared,
                mpt_cols, mpt_rows):
        x = self.sequence(input_ids, order, prompt_embeds, mpt_task_ids, mpt_shared_ids, mpt_shared, mpt_cols,
                          mpt_rows)
        hidden = self.model.encoder(inputs_embeds=x, attention_mask=attention_mask, return_dict=True).last_hidden_state
        heads = self.model.config.num_heads
        out = []
        for block in self.model.decoder.block:
            attn = block.layer[1].EncDecAttention
            out += [_heads(attn.k(hidden), heads), _heads(attn.v(hidden), heads)]
        return tuple(out)


class Seq2SeqDecoderStep(nn.Module):
    """One cached decoder call: new tokens attend to the self-attention past (prefix and tokens so far)
    and to the encoder's precomputed cross-attention keys/values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        self.layers = len(model.decoder.block)
        self.eval()

    def forward(self, input_ids, attention_mask, encoder_attention_mask, *past):
        cfg, dec = self.config, self.model.decoder
        heads = cfg.num_heads
        self_past, cross = past[: 2 * self.layers], past[2 * self.layers:]
        x = dec.embed_tokens(input_ids)
        q_len = input_ids.shape[1]
        past_len = self_past[0].shape[2]
        k_len = past_len + q_len
        neg = torch.finfo(x.dtype).min
        # Self-attention: relative position bias of the first block, causal + padding mask.
        bias = dec.block[0].layer[0].SelfAttention.compute_bias(q_len, k_len, device=x.device,
                                                                past_seen_tokens=past_len)
        query_pos = torch.arange(q_len, device=x.device)[:, None] + past_len
        causal = torch.arange(k_len, device=x.device)[None, :] <= query_pos
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        self_bias = bias + torch.where(allowed, 0.0, neg).to(x.dtype)
        cross_bias = torch.where(encoder_attention_mask[:, None, None, :].bool(), 0.0, neg).to(x.dtype)

        presents = []
        for i, block in enumerate(dec.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            k = torch.cat([self_past[2 * i].to(x.dtype), _heads(att.k(h), heads)], dim=2)
            v = torch.cat([self_past[2 * i + 1].to(x.dtype), _heads(att.v(h), heads)], dim=2)
            presents += [k, v]
            x = x + _attend(_heads(att.q(h), heads), k, v, self_bias, att.o)
            h = ca.layer_norm(x)
            att = ca.EncDecAttention
            x = x + _attend(_heads(att.q(h), heads), cross[2 * i].to(x.dtype), cross[2 * i + 1].to(x.dtype),
                            cross_bias, att.o)
            x = ff(x)
        x = dec.final_layer_norm(x[:, -1])
        if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings):
            x = x * (cfg.d_model ** -0.5)
        return (self.model.lm_head(x), *presents)


