"""The seq2seq computation shared by the export and the torch backend: the encoder with the prompts as inputs (its
outputs: every decoder layer's cross-attention keys/values) and one cached decoder step, written with the model's
own modules (gpt-fast style) so the cache is plain tensors. One step per family (the row's `decoder_step`): T5
(relative position bias, unscaled attention, pre-LayerNorm) and BART (positions per row, scaled attention; the
families derived from BART read their differences from the modules: BartDecoderStep). Where each kind's prompt goes is described in
export/seq2seq_export.py."""

from __future__ import annotations

import torch
from torch import nn

from .archs import arch_for, decoder_sizes
from .graph import PromptedBackbone
from .io_spec import SEQ2SEQ_ENCODER_INPUTS

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
    """Attention without scaling (T5's; BART scales q first); bias carries the position bias and the mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    ctx = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
    b, h, s, dk = ctx.shape
    return out(ctx.transpose(1, 2).reshape(b, s, h * dk))


def cross_projections(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """Each decoder layer's cross-attention key and value projections."""
    if arch_for(model.config).decoder_step == "bart":
        return [(layer.encoder_attn.k_proj, layer.encoder_attn.v_proj) for layer in model.model.decoder.layers]
    return [(block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v) for block in model.decoder.block]


class PromptedEncoder(PromptedBackbone):
    """The encoder with input-level and MPT prompts in front; outputs every decoder layer's cross-attention K/V."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.cross = cross_projections(model)
        self.heads = decoder_sizes(model.config)[1]
        encoder = model.get_encoder()
        self.embed_scale = float(getattr(encoder, "embed_scale", 1.0))
        positions = getattr(encoder, "embed_positions", None)
        self.ids_positions = (positions.weights, positions.padding_idx) if hasattr(
            positions, "create_position_ids_from_input_ids") and hasattr(positions, "weights") else None

    def forward(self, input_ids, *args):
        inputs = dict(zip(SEQ2SEQ_ENCODER_INPUTS, (input_ids, *args)))  # io_spec's order, read by name
        attention_mask, order = inputs["attention_mask"], inputs["order"]
        x = self.sequence(inputs)
        # PEFT gives the encoder input_ids for rows without virtual tokens (prefix tuning) and embeddings with the
        # prompt for the others; some families treat the two differently. A row's first element is a prompt slot
        # iff it has virtual tokens.
        tokens_only = order[:, :1] >= order.shape[1] - input_ids.shape[1]
        if self.embed_scale != 1.0:  # Marian, Pegasus, BlenderbotSmall scale only embeddings they look up
            x = x * torch.where(tokens_only, self.embed_scale, 1.0).to(x.dtype)[:, :, None]
        if self.ids_positions is not None:
            # M2M100 counts positions over the non-pad input_ids, but sequentially over given embeddings: the rows
            # given ids get the difference added, so the encoder's own sequential positions come out as PEFT's.
            table, pad = self.ids_positions
            seq = pad + 1 + torch.arange(x.shape[1], device=x.device)
            m = attention_mask.long()
            want = torch.where(tokens_only, torch.where(m == 1, pad + torch.cumsum(m, 1), pad), seq[None, :])
            x = x + (table[want] - table[seq][None]).to(x.dtype)
        hidden = self.model.get_encoder()(inputs_embeds=x, attention_mask=attention_mask,
                                          return_dict=True).last_hidden_state
        out = []
        for k, v in self.cross:
            out += [_heads(k(hidden), self.heads), _heads(v(hidden), self.heads)]
        return tuple(out)


def decoder_step(model: nn.Module) -> Seq2SeqDecoderStep:
    """The family's cached decoder step."""
    return {"t5": T5DecoderStep, "bart": BartDecoderStep}[arch_for(model.config).decoder_step](model)


class Seq2SeqDecoderStep(nn.Module):
    """One cached decoder call: new tokens attend to the self-attention past (prefix and tokens so far)
    and to the encoder's precomputed cross-attention keys/values. Inputs: input_ids [B, q], attention_mask
    [B, past + q] (the self-attention cache's and the new tokens'), encoder_attention_mask [B, L], the past."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        self.layers, self.heads, self.head_dim = decoder_sizes(model.config)
        self.eval()


class T5DecoderStep(Seq2SeqDecoderStep):
    def forward(self, input_ids, attention_mask, encoder_attention_mask, *past):
        cfg, dec = self.config, self.model.decoder
        heads = self.heads
        self_past, cross = past[: 2 * self.layers], past[2 * self.layers:]
        x = dec.embed_tokens(input_ids)
        q_len = input_ids.shape[1]
        past_len = self_past[0].shape[2]
        k_len = past_len + q_len
        neg = torch.finfo(x.dtype).min
        # Self-attention: relative position bias (the first block's, shared by the others as in T5; a block with its
        # own, as in UMT5, uses that), causal + padding mask.
        query_pos = torch.arange(q_len, device=x.device)[:, None] + past_len
        causal = torch.arange(k_len, device=x.device)[None, :] <= query_pos
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask_bias = torch.where(allowed, 0.0, neg).to(x.dtype)
        cross_bias = torch.where(encoder_attention_mask[:, None, None, :].bool(), 0.0, neg).to(x.dtype)

        presents = []
        for i, block in enumerate(dec.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
            if i == 0 or getattr(sa.SelfAttention, "has_relative_attention_bias", False):
                self_bias = sa.SelfAttention.compute_bias(q_len, k_len, device=x.device,
                                                          past_seen_tokens=past_len) + mask_bias
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




class BartDecoderStep(Seq2SeqDecoderStep):
    """BART and the families transformers derives from it (mBART, Marian, Pegasus, M2M100, Blenderbot,
    BlenderbotSmall), their differences read from the modules: the embedding scale (in the word embedding, or the
    decoder's embed_scale), the position table (learned or sinusoidal; its offset: BART's 2, M2M100's
    padding_idx + 1), an embedding LayerNorm (after adding the positions, or before for BlenderbotSmall: the row's
    embed_norm), and LayerNorm before each block with a final one (where the decoder has `layer_norm`) or after each
    block. Positions are counted per row over the attended cache: a row's decoder tokens follow its own
    prefix-tuning prefix (n + j, as PEFT's cache length gives them) whatever the batch's longest."""

    def forward(self, input_ids, attention_mask, encoder_attention_mask, *past):
        dec = self.model.model.decoder
        pre_norm = getattr(dec, "layer_norm", None) is not None
        embed_norm = getattr(dec, "layernorm_embedding", None) or nn.Identity()
        table, offset = position_table(dec.embed_positions)
        self_past, cross = past[: 2 * self.layers], past[2 * self.layers:]
        x = dec.embed_tokens(input_ids) * getattr(dec, "embed_scale", 1.0)  # or scaled inside embed_tokens
        q_len = input_ids.shape[1]
        past_len = self_past[0].shape[2]
        k_len = past_len + q_len
        positions = table[(torch.cumsum(attention_mask, -1) - 1).clamp(min=0)[:, -q_len:] + offset].to(x.dtype)
        if arch_for(self.config).embed_norm == "before_positions":
            x = embed_norm(x) + positions
        else:
            x = embed_norm(x + positions)
        neg = torch.finfo(x.dtype).min
        query_pos = torch.arange(q_len, device=x.device)[:, None] + past_len
        causal = torch.arange(k_len, device=x.device)[None, :] <= query_pos
        self_bias = torch.where(causal[None, None] & attention_mask[:, None, None, :].bool(), 0.0, neg).to(x.dtype)
        cross_bias = torch.where(encoder_attention_mask[:, None, None, :].bool(), 0.0, neg).to(x.dtype)
        scale = self.head_dim ** -0.5

        def block(x, norm, attend):
            h = attend(norm(x) if pre_norm else x)
            return x + h if pre_norm else norm(x + h)

        presents = []
        for i, layer in enumerate(dec.layers):
            sa, ca = layer.self_attn, layer.encoder_attn

            def self_attention(h, sa=sa, i=i):
                k = torch.cat([self_past[2 * i].to(h.dtype), _heads(sa.k_proj(h), self.heads)], dim=2)
                v = torch.cat([self_past[2 * i + 1].to(h.dtype), _heads(sa.v_proj(h), self.heads)], dim=2)
                presents.extend([k, v])
                return _attend(_heads(sa.q_proj(h), self.heads) * scale, k, v, self_bias, sa.out_proj)

            def cross_attention(h, ca=ca, i=i):
                return _attend(_heads(ca.q_proj(h), self.heads) * scale, cross[2 * i].to(h.dtype),
                               cross[2 * i + 1].to(h.dtype), cross_bias, ca.out_proj)

            x = block(x, layer.self_attn_layer_norm, self_attention)
            x = block(x, layer.encoder_attn_layer_norm, cross_attention)
            x = block(x, layer.final_layer_norm, lambda h, layer=layer: layer.fc2(layer.activation_fn(layer.fc1(h))))
        x = x[:, -1]
        if pre_norm:
            x = dec.layer_norm(x)
        logits = self.model.lm_head(x)
        bias = getattr(self.model, "final_logits_bias", None)
        return (logits if bias is None else logits + bias.to(x.dtype), *presents)


def position_table(module: nn.Module) -> tuple[torch.Tensor, int]:
    """(table, offset): the row of position p is table[p + offset]. M2M100's sinusoidal table is a buffer indexed
    from padding_idx + 1; the others are embeddings (BART's learned one with its offset of 2)."""
    if hasattr(module, "weights"):
        return module.weights, module.padding_idx + 1
    return module.weight, getattr(module, "offset", 0)
