"""The frozen backbone with the prompt mechanism folded in and every prompt an input.

`PromptedBackbone` is what gets exported to ONNX and also what the torch backend runs, so
both backends compute the same thing. One forward serves a batch whose rows belong to
different tasks of different kinds:

    token embeddings [B, S, d]
      <- concat in front: input-level prompts [B, P, d]         (prompt tuning, P-tuning, CPT)
      <- MPTPromptConcat in front: composed MPT prompts [B, Tm, d]
      -> reorder each row with `order` [B, L] so its real virtual tokens come first, then its
         tokens, then unused prompt slots (L = Tm + P + S)
      -> backbone with key/value prefixes [layers, B, kv_heads, N, head_dim] (prefix tuning, CARTRIDGE)
         as the cache, the host-built attention mask [B, N + L] and position ids [B, L]

The host (core/layout.py, with each row's kind) builds order, mask and position ids so that every row sees
exactly what PEFT's forward gives that row alone: unused slots are masked out, and position
ids follow PEFT's rules per kind and architecture.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from promptmux.kernels.mpt_reference import mpt_prompt_concat

from .archs import arch_for
from .io_spec import DECODER_INPUTS, MPT_INPUTS, PREFIX_INPUTS, input_names, prompt_inputs


class PromptedBackbone(nn.Module):
    """Wraps a transformers *ForSequenceClassification (an encoder's, or a causal LM's) or *ForCausalLM model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.spec = arch_for(model.config)
        self.num_layers = model.config.num_hidden_layers
        self.embed = model.get_input_embeddings()
        self.eval()  # the wrapper itself too: nn.Module starts in training mode

    def sequence(self, inputs: dict):
        """Token embeddings with the input-level and MPT prompts in front, each row reordered by `order`."""
        tokens = self.embed(inputs["input_ids"])
        x = torch.cat([inputs["prompt_embeds"].to(tokens.dtype), tokens], dim=1)
        x = mpt_prompt_concat(*(inputs[n] for n in MPT_INPUTS), x)
        return torch.gather(x, 1, inputs["order"].unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def forward(self, input_ids, *args):
        # The graph's inputs in io_spec's order (a graph without prefix inputs stops before them), read by name.
        inputs = dict(zip(input_names(self.spec), (input_ids, *args)))
        attention_mask = inputs["attention_mask"]
        x = self.sequence(inputs)
        kwargs = dict(inputs_embeds=x, attention_mask=attention_mask, position_ids=inputs["position_ids"])
        if "prefix_keys" in inputs:  # prefix tuning: the per-row prefixes are the cache the tokens attend to
            keys, values = inputs["prefix_keys"], inputs["prefix_values"]
            kwargs["past_key_values"] = DynamicCache(
                [(keys[i].to(x.dtype), values[i].to(x.dtype)) for i in range(self.num_layers)],
                config=self.model.config,
            )
        if "token_type_ids" in inputs:
            kwargs["token_type_ids"] = inputs["token_type_ids"]

        if not self.spec.family.classifies:  # a language model: its logits at every position
            return self.model(**kwargs, return_dict=True).logits
        out = self.model.base_model(**kwargs, return_dict=True)
        if self.spec.feature == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.spec.feature == "last":  # a causal LM's classifier: each row's last attended position
            length = hidden.shape[1]
            attended = attention_mask[:, -length:]  # the sequence's part of the mask (after any prefix slots)
            last = (torch.arange(length, device=hidden.device) * attended).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return hidden[:, 0]


class FoldedBackbone(nn.Module):
    """One task's prompt baked in as constants; only the token and layout inputs remain."""

    def __init__(self, backbone: PromptedBackbone, prompt_tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.backbone = backbone
        self.has_prefix = backbone.spec.supports_prefix
        for name in prompt_inputs(backbone.spec):
            self.register_buffer(name, prompt_tensors[name], persistent=False)
        self.eval()

    def forward(self, input_ids, *layout):
        batch = input_ids.shape[0]

        def rows(t):  # per-row prompt tensors are stored for batch 1
            return t.expand(batch, *t.shape[1:])

        prompts = {"prompt_embeds": rows(self.prompt_embeds), "mpt_task_ids": self.mpt_task_ids.expand(batch)}
        if self.has_prefix:
            prompts |= {n: getattr(self, n).expand(-1, batch, -1, -1, -1) for n in PREFIX_INPUTS}
        return self.backbone(input_ids, *layout, *(prompts.get(n, getattr(self, n))
                                                   for n in prompt_inputs(self.backbone.spec)))


class PromptedDecoder(PromptedBackbone):
    """A causal LM for cached generation: one graph for prefill and every decoding step.

    Inputs are those of PromptedBackbone (prompts still inputs) plus `logits_index` [B] (the position
    whose next-token logits each row needs) and the cache `past_key_values.{i}.key/value`
    [B, kv_heads, past, head_dim]; outputs `logits` [B, vocab] and `present.{i}.key/value` (past plus
    this call's positions). The past holds prefix-tuning prefixes, precomputed prompt key/values, or
    the tokens so far; any of them may be empty.
    """

    def forward(self, input_ids, *args):
        # DECODER_INPUTS in io_spec's order, then the past (past_key_values.{i}.key/value).
        inputs = dict(zip(DECODER_INPUTS, (input_ids, *args)))
        past = args[len(DECODER_INPUTS) - 1:]
        x = self.sequence(inputs)
        attention_mask, position_ids, logits_index = (inputs[n] for n in ("attention_mask", "position_ids",
                                                                          "logits_index"))
        cache = DynamicCache([(past[2 * i].to(x.dtype), past[2 * i + 1].to(x.dtype))
                              for i in range(self.num_layers)], config=self.model.config)
        out = self.model.base_model(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=cache, use_cache=True, return_dict=True)
        hidden = torch.gather(out.last_hidden_state, 1,
                              logits_index.view(-1, 1, 1).expand(-1, 1, out.last_hidden_state.shape[-1]))
        logits = self.model.get_output_embeddings()(hidden)[:, 0]
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)
