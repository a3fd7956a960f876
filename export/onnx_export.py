"""Export a PromptedBackbone (or a folded one) to ONNX and optimize it with ONNX Runtime."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from promptmux.core.archs import arch_for, dims_of
from promptmux.core.durable import save_onnx
from promptmux.core.graph import FoldedBackbone, PromptedBackbone
from promptmux.core.io_spec import (
    INPUTS,
    PREFIX_INPUTS,
    PROMPT_INPUTS,
    dynamic_axes,
    example_sizes,
    input_names,
    input_shape,
    output_name,
    prompt_inputs,
)

from . import attention_3d, mpt_function, pooled_row

log = logging.getLogger("promptmux.export")

# Opset 23 has the standard `Attention` op: the exporter turns each SDPA call into one node that ONNX Runtime and
# OpenVINO both run with their own fused kernels (instead of MatMul/Softmax/MatMul plus NaN guards).
OPSET = 23
# torch.onnx.export(optimize=...): onnxscript's optimizer (constant folding, rewrite rules) on each exported graph;
# studies/export_optimize.py measures what it costs at export and gives at run time.
ONNXSCRIPT_OPTIMIZER = True
# Rewrite rules of that optimizer left out. SlicesSplit (two Slices halving a tensor's last axis -> one Split) is a
# two-node pattern, tried on pairs of Slice nodes: 7.3 s of each of the optimizer's two passes over SmolLM2's decoder
# graph (the optimizer took 20.7 s of a 68-s export on an AMX Xeon), and it applied to no graph the tests export (it
# did not fire even on a bare graph of two halving Slices). The graphs are the same without it
# (python -m studies.export_rules); one where it would fire keeps its two Slices, which give the same values.
SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})
# Rules of promptmux's own that the optimizer applies beside its defaults: Attention on 3-D projections (no
# head transposes; attention_3d.py).
EXTRA_REWRITE_RULES = attention_3d.RULES
# An encoder classifier's last layer after its keys and values computed at the position the head reads only
# (pooled_row.py): MiniLM 1.09-1.19x on both CPU engines (python -m studies.pooled_row).
POOLED_ROW = True

def example_inputs(config, tm: int = 5, p: int = 3, n: int = 4) -> dict[str, torch.Tensor]:
    """Inputs of io_spec's example sizes (pairwise different, so the exporter keeps every axis symbolic).

    A folded export passes its constant prompt sizes (tm, p, n) so the layout inputs agree with them.
    """
    dims = dims_of(config)
    if not arch_for(config).supports_prefix:
        n = 0  # no prefix slots in the mask
    sizes = example_sizes(tm, p, n)
    g = torch.Generator().manual_seed(0)
    ex = {}
    for name in input_names(arch_for(config)):
        shape = input_shape(name, dims, sizes)
        if INPUTS[name].dtype == "float32":
            ex[name] = torch.randn(*shape, generator=g)
        elif name == "input_ids":
            ex[name] = torch.randint(0, min(dims.vocab_size, 50), shape, generator=g)
        elif name in ("position_ids", "order"):
            ex[name] = torch.arange(shape[1]).repeat(shape[0], 1)
        elif name == "attention_mask":
            ex[name] = torch.ones(shape, dtype=torch.long)
        else:  # token type and MPT ids: 0 is valid for every graph
            ex[name] = torch.zeros(shape, dtype=torch.long)
    return ex


def dynamic_shapes(names: list[str]):
    auto = torch.export.Dim.AUTO
    shapes = [{axis: auto for axis in dynamic_axes(name)} for name in names]
    # forward(input_ids, *args): the exporter wants the same nesting for the shapes
    return (shapes[0], tuple(shapes[1:]))


def rename_axes(model: onnx.ModelProto) -> None:
    """Give the exporter's symbols (s72, ...) the readable names of io_spec's axes, everywhere in the graph."""
    rename = {}
    for inp in model.graph.input:
        if inp.name not in INPUTS and not inp.name.startswith("past_key_values."):
            continue
        names = dynamic_axes(inp.name)
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.dim_param and axis in names:
                rename.setdefault(dim.dim_param, names[axis])
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


@functools.cache
def _registry():
    """torchlib's ONNX translations plus the MPT op. torch.onnx.export builds this registry again for every
    graph (0.6-0.9 s each on a 2-core CPU); one per process serves every export."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
    registry.register_op(torch.ops.promptmux.mpt_prompt_concat.default, mpt_function.torch_translation(),
                         is_complex=False)
    return registry


def to_onnx(module, args: tuple, input_names: list[str], output_names: list[str], dynamic_shapes) -> onnx.ModelProto:
    """torch.onnx's dynamo export (what torch.onnx.export(dynamo=True) runs) with the cached registry; through
    the public call, registry rebuilt, if this torch moved the private entry point."""
    options = dict(dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                   optimize=ONNXSCRIPT_OPTIMIZER, verbose=False)
    with _optimizer_rules(SKIPPED_REWRITE_RULES, EXTRA_REWRITE_RULES):
        try:
            from torch.onnx._internal.exporter import _core

            registry = _registry()
        except (ImportError, AttributeError):
            return torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, custom_translation_table={
                torch.ops.promptmux.mpt_prompt_concat.default: mpt_function.torch_translation()},
                **options).model_proto
        return _core.export(module, args, registry=registry, opset_version=OPSET, **options).model_proto


@contextlib.contextmanager
def _optimizer_rules(skipped: frozenset[str], extra: tuple = ()):
    """onnxscript's default rewrite rules without `skipped`, and with `extra`, while the block runs (its optimizer
    reads the table at each call); the defaults as they are where this onnxscript keeps the table elsewhere."""
    try:
        from onnxscript import rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = (*(r for r in rules if getattr(r, "name", None) not in skipped), *extra)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def export_onnx(module: torch.nn.Module, config, path: Path, folded: bool = False, prefix: bool = True) -> Path:
    """torch.onnx (dynamo) export with the MPT op as one node, then attach its function body. prefix=False: the
    graph without prefix inputs (for batches in which no row has a key/value prefix)."""
    names = input_names(arch_for(config))
    if not prefix:
        names = [n for n in names if n not in PREFIX_INPUTS]
        ex = {n: v for n, v in example_inputs(config, n=0).items() if n in names}
    elif folded:
        n = module.prefix_keys.shape[3] if module.has_prefix else 0
        sizes = dict(tm=module.mpt_shared.shape[1], p=module.prompt_embeds.shape[1], n=n)
        names = [n for n in names if n not in PROMPT_INPUTS]
        ex = {n: v for n, v in example_inputs(config, **sizes).items() if n in names}
    else:
        ex = example_inputs(config)
    model = to_onnx(module, tuple(ex.values()), names, [output_name(arch_for(config))], dynamic_shapes(names))
    if POOLED_ROW:
        log.debug("%s: %d nodes on the pooled row only", path.name, pooled_row.keep_pooled_row(model))
    if not folded:
        mpt_function.attach(model)
    elif any(n.domain == mpt_function.DOMAIN for n in model.graph.node):
        mpt_function.attach(model)
    rename_axes(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    onnx.checker.check_model(str(path))
    return path


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with the weights in PATH.data beside the graph (external data keeps large models loadable)."""
    save_onnx(model, path, path.name + ".data")


# ORT's transformer optimizer knows these families under these names.
TRANSFORMER_OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "gpt2": "gpt2"}


def _max_diff(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    return float(np.abs(out - reference).max())


def check_graph(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray, tolerance: float) -> float:
    """The exported graph's largest difference from PyTorch on a check batch; raises beyond the tolerance."""
    diff = _max_diff(path, feeds, reference)
    if not diff <= _allowed(reference, tolerance):
        raise RuntimeError(f"the exported graph differs from PyTorch by {diff:.2e} (> {tolerance:g} of the outputs' "
                           "scale); please report this with the base model's config")
    return diff


def optimize_onnx(path: Path, config, feeds: dict[str, np.ndarray], reference: np.ndarray, tolerance: float) -> dict:
    """Apply ONNX Runtime's graph optimizations offline (opt-in: the graph then holds ORT-only contrib ops, which
    OpenVINO and TensorRT cannot read), keeping each step only if outputs still match.

    1. Level EXTENDED (constant folding, redundant-node elimination, fusions such as SkipLayerNormalization)
       is kept in the file; hardware-specific rewrites (ENABLE_ALL) are applied by each session at load.
    2. ORT's transformer optimizer (fusions in Python: attention, Gelu, ...) where it knows the family.
    Returns a report for the manifest.
    """
    report = {"extended": _ort_extended(path, feeds, reference, tolerance)}
    opt_type = TRANSFORMER_OPTIMIZER_TYPES.get(config.model_type)
    if opt_type:
        report["transformer_optimizer"] = _transformer_optimizer(path, config, opt_type, feeds, reference, tolerance)
    return report


def _adopt(path: Path, tmp: Path, kept: bool) -> None:
    """Replace the graph at path by the candidate graph tmp when kept, then remove tmp's files. Saved again
    rather than renamed: a file records where its external data lives (and saving moves a model's tensors out to
    that file, so the candidate is read back from tmp)."""
    try:
        if kept:
            save_model(onnx.load(str(tmp)), path)
    finally:
        for f in (tmp, tmp.with_name(tmp.name + ".data")):
            f.unlink(missing_ok=True)


def _transformer_optimizer(path, config, opt_type, feeds, reference, tolerance) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    dims = dims_of(config)
    tmp = path.with_name(path.stem + ".tf.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its modules log under bare names ("onnx_model", ...) about patterns not found
    try:
        model = optimize_model(str(path), model_type=opt_type, num_heads=dims.num_heads,
                               hidden_size=dims.hidden_size, opt_level=0)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        save_model(model.model, tmp)
        diff = _max_diff(tmp, feeds, reference)
    except Exception as e:  # the optimizer is pattern-based; a graph it cannot handle stays as it is
        log.info("ORT transformer optimizer skipped (no pattern it knows): %s", e)
        _adopt(path, tmp, False)
        return {"kept": False, "error": str(e)[:300]}
    finally:
        root.setLevel(level)
    report = {"model_type": opt_type, "fusions": fused, "max_abs_diff": diff,
              "kept": bool(fused) and diff <= _allowed(reference, tolerance)}
    _adopt(path, tmp, report["kept"])
    return report


def _allowed(reference: np.ndarray, tolerance: float) -> float:
    """The difference an optimization may cause: tolerance, scaled up for outputs larger than 1 (the logits of
    a real LM reach tens, where fp32 reordering alone moves them by ~1e-4)."""
    return tolerance * max(1.0, float(np.abs(reference).max()))


def _ort_extended(path: Path, feeds, reference, tolerance) -> dict:
    import onnxruntime as ort

    tmp = path.with_name(path.stem + ".opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", tmp.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    after = len(onnx.load(str(tmp), load_external_data=False).graph.node)
    diff = _max_diff(tmp, feeds, reference)
    report = {"nodes_before": before, "nodes_after": after, "max_abs_diff": diff}
    report["kept"] = diff <= _allowed(reference, tolerance)
    if not report["kept"]:
        log.warning("ORT-optimized graph differs by %.2e (> %.0e of the outputs' scale); keeping the unoptimized "
                    "graph", diff, tolerance)
    _adopt(path, tmp, report["kept"])
    return report


def fold_task(backbone: PromptedBackbone, layout_feeds: dict[str, np.ndarray]) -> FoldedBackbone:
    """A backbone with one task's prompt tensors (from a batch-1 layout) as constants."""
    names = prompt_inputs(backbone.spec)
    consts = {n: torch.from_numpy(np.ascontiguousarray(layout_feeds[n])) for n in names}
    return FoldedBackbone(backbone, consts)


def export_decoder_onnx(module, config, path: Path) -> Path:
    """Export a PromptedDecoder: prompts as inputs plus Optimum-named cache inputs and outputs."""
    from promptmux.core.io_spec import DECODER_INPUTS, past_names, present_names

    dims = dims_of(config)
    base = example_inputs(config)  # b=2, s=9, p=3, tm=5 (n unused: the cache replaces prefix inputs)
    b, past = base["input_ids"].shape[0], 4
    length = base["order"].shape[1]
    g = torch.Generator().manual_seed(1)
    ex = {n: base[n] for n in DECODER_INPUTS if n in base}
    ex["attention_mask"] = torch.ones(b, past + length, dtype=torch.long)
    ex["logits_index"] = torch.full((b,), length - 1, dtype=torch.long)
    for name in past_names(dims.num_layers):
        ex[name] = torch.randn(b, dims.num_kv_heads, past, dims.head_dim, generator=g)
    names = list(ex)
    auto = torch.export.Dim.AUTO
    shapes = {n: {a: auto for a in dynamic_axes(n)} for n in names}
    # forward(input_ids, *args): the rest of the inputs, the past last, nest as one tuple
    model = to_onnx(module, tuple(ex.values()), names, ["logits", *present_names(dims.num_layers)],
                     (shapes[names[0]], tuple(shapes[n] for n in names[1:])))
    mpt_function.attach(model)
    rename_axes(model)
    save_model(model, path)
    onnx.checker.check_model(str(path))
    return path


def share_weights(variant: Path, main: Path) -> int:
    """Point the variant graph's weights at the main graph's data file where the main graph holds the same tensor
    (same shape, type and bytes; matched by content, since the exporter names folded constants differently in each
    export), so that a second graph costs no second copy of the weights on disk. Initializers with no twin are stored
    inline. Returns the bytes shared."""
    import hashlib

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    def external(model: onnx.ModelProto, folder: Path):
        for t in model.graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                with open(folder / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    data = f.read(info.length)
                yield t, (tuple(t.dims), t.data_type, hashlib.sha256(data).hexdigest()), data

    var, ref = onnx.load(str(variant), load_external_data=False), onnx.load(str(main), load_external_data=False)
    twins = {key: list(t.external_data) for t, key, _ in external(ref, main.parent)}
    shared = 0
    for tensor, key, data in list(external(var, variant.parent)):
        del tensor.external_data[:]
        if key in twins:
            tensor.external_data.extend(twins[key])
            shared += len(data)
        else:
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
    onnx.save(var, str(variant))
    variant.with_name(variant.name + ".data").unlink(missing_ok=True)
    return shared
