"""Seq2seq (T5, BART): an encoder graph with the prompts as inputs, and a cached decoder-step graph.

Where PEFT puts each kind's prompt in a seq2seq model (`PeftModelForSeq2SeqLM.generate`):
- prompt tuning, P-tuning, MPT: the first `num_virtual_tokens` prompt rows go in front of the
  encoder input (an MPT adapter's decoder half, `num_transformer_submodules=2`, is used by PEFT's
  training forward only, never by generate, so the bank keeps the encoder half).
- prefix tuning: the prefixes become the decoder's self-attention cache; the encoder and the
  cross-attention see no prefix (PEFT resets the cross-attention cache).

Graphs (Optimum's seq2seq cache names):
    encoder.onnx  input_ids, attention_mask, order, prompts  ->  present.{i}.encoder.key/value
                  (each decoder layer's cross-attention keys/values, computed once per request)
    decoder.onnx  input_ids [B, q], attention_mask [B, past + q], encoder_attention_mask [B, L],
                  past_key_values.{i}.decoder.key/value, past_key_values.{i}.encoder.key/value
                  ->  logits [B, vocab] (last position), present.{i}.decoder.key/value
The decoder step is written out with the model's own modules (gpt-fast style) so the cache is
plain tensors (core/seq2seq_graph.py). T5 attention is unscaled, with a relative position bias from the first
block; BART's learned decoder positions are counted per row over the attended cache. Only distances matter to
T5's bias (and BART counts attended entries), so a row whose prefix is shorter than the batch's gets its
masked slots in *front* of the prefix, keeping every real key at the distance PEFT gives it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from promptmux.core.io_spec import SEQ2SEQ_ENCODER_INPUTS as ENCODER_INPUTS
from promptmux.core.io_spec import dynamic_axes
from promptmux.core.seq2seq_graph import (
    PromptedEncoder,
    Seq2SeqDecoderStep,
    cross_names,
    cross_projections,
    self_names,
)

from . import mpt_function


def _export(module, example: dict[str, torch.Tensor], shapes, output_names: list[str], path: Path,
            axis_names: dict[str, dict[int, str]]) -> Path:
    from .onnx_export import save_model

    program = torch.onnx.export(
        module, tuple(example.values()), dynamo=True, input_names=list(example), output_names=output_names,
        dynamic_shapes=shapes,
        custom_translation_table={torch.ops.promptmux.mpt_prompt_concat.default: mpt_function.torch_translation()},
        optimize=True, verbose=False,
    )
    model = program.model_proto
    if any(n.domain == mpt_function.DOMAIN for n in model.graph.node):
        mpt_function.attach(model)
    _name_axes(model, axis_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    onnx.checker.check_model(str(path))
    return path


def _name_axes(model: onnx.ModelProto, axis_names: dict[str, dict[int, str]]) -> None:
    rename = {}
    for inp in model.graph.input:
        for axis, nice in axis_names.get(inp.name, {}).items():
            dim = inp.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                rename.setdefault(dim.dim_param, nice)
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def encoder_example(config) -> dict[str, torch.Tensor]:
    from .onnx_export import example_inputs

    ex = example_inputs(config)
    length = ex["order"].shape[1]
    ex["attention_mask"] = torch.ones(ex["input_ids"].shape[0], length, dtype=torch.long)
    return {n: ex[n] for n in ENCODER_INPUTS}


def export_encoder_onnx(module: PromptedEncoder, config, path: Path) -> Path:
    ex = encoder_example(config)
    auto = torch.export.Dim.AUTO
    names = {n: dynamic_axes(n) for n in ex}
    names["attention_mask"][1] = "length"  # no prefix slots in the encoder
    shapes = {n: {a: auto for a in axes} for n, axes in names.items()}
    layers = len(cross_projections(module.model))
    first, *rest = ex  # forward(input_ids, *args): the other inputs nest as one tuple
    return _export(module, ex, (shapes[first], tuple(shapes[n] for n in rest)), cross_names(layers, "present"), path,
                   names)


def export_decoder_step_onnx(module: Seq2SeqDecoderStep, config, path: Path) -> Path:
    b, q, past, length = 2, 3, 5, 7
    heads, dk = module.heads, module.head_dim
    g = torch.Generator().manual_seed(2)
    ex = {
        "input_ids": torch.randint(0, min(config.vocab_size, 50), (b, q), generator=g),
        "attention_mask": torch.ones(b, past + q, dtype=torch.long),
        "encoder_attention_mask": torch.ones(b, length, dtype=torch.long),
    }
    layers = module.layers
    for name in self_names(layers):
        ex[name] = torch.randn(b, heads, past, dk, generator=g)
    for name in cross_names(layers):
        ex[name] = torch.randn(b, heads, length, dk, generator=g)
    auto = torch.export.Dim.AUTO
    shapes = [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}]
    past_shapes = tuple({0: auto, 2: auto} for _ in range(4 * layers))
    names = {"input_ids": {0: "batch", 1: "new_tokens"}, "attention_mask": {0: "batch", 1: "past_plus_new"},
             "encoder_attention_mask": {0: "batch", 1: "encoder_length"}}
    for name in self_names(layers):
        names[name] = {0: "batch", 2: "past_length"}
    for name in cross_names(layers):
        names[name] = {0: "batch", 2: "encoder_length"}
    return _export(module, ex, (*shapes, past_shapes), ["logits", *self_names(layers, "present")], path, names)


def check_against_torch(encoder: PromptedEncoder, step: Seq2SeqDecoderStep, enc_path: Path, dec_path: Path,
                        enc_feeds: dict[str, np.ndarray]) -> float:
    """Largest difference between the exported graphs and the torch modules on a real layout batch, relative to
    each output's scale (max |ref|, at least 1): keys/values of large models reach the hundreds."""
    import onnxruntime as ort

    with torch.inference_mode():
        want_cross = encoder(*[torch.from_numpy(enc_feeds[n]) for n in ENCODER_INPUTS])
    enc = ort.InferenceSession(str(enc_path), providers=["CPUExecutionProvider"])
    got_cross = enc.run(None, {n: enc_feeds[n] for n in ENCODER_INPUTS})
    def rel(g, w):
        w = w.numpy()
        return float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))

    worst = max(rel(g, w) for g, w in zip(got_cross, want_cross))
    b = enc_feeds["input_ids"].shape[0]
    rng = np.random.default_rng(0)
    layers = step.layers
    cfg = step.config
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (b, 1)),
             "attention_mask": np.ones((b, 4), np.int64),
             "encoder_attention_mask": enc_feeds["attention_mask"]}
    feeds["attention_mask"][0, :2] = 0
    for name in self_names(layers):
        feeds[name] = rng.standard_normal((b, step.heads, 3, step.head_dim)).astype(np.float32)
    for name, value in zip(cross_names(layers), got_cross):
        feeds[name] = value
    with torch.inference_mode():
        want = step(*[torch.from_numpy(v) for v in feeds.values()])
    dec = ort.InferenceSession(str(dec_path), providers=["CPUExecutionProvider"])
    got = dec.run(None, feeds)
    return max(worst, *(rel(g, w) for g, w in zip(got, want)))
