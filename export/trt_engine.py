"""TensorRT engines from a deployment's ONNX graphs, built ahead of time (no GPU needed with TensorRT-RTX).

    settings = build_engine(deploy_dir, precision="fp16")      # writes deploy_dir/model.engine
    record_engine(deploy_dir, settings)                          # manifest.json gets "engine": settings
    engine = load_engine(deploy_dir / "model.engine", settings)  # on a GPU; refuses foreign engines

The build works on a copy of the graph in memory (model.onnx stays as it is, for ONNX Runtime):

- use_plugin: the `ai.mpt::MPTPromptConcat` node gets the attributes plugin_namespace="ai.mpt" and
  plugin_version="1", so the ONNX parser imports it as the Python plugin of
  kernels/tensorrt_plugin.py instead of inlining the node's function body; the build then checks that
  the network really holds that plugin layer (an unregistered plugin is silently inlined).
- precision: TensorRT-RTX networks are strongly typed (it has no FP16 builder flag), so fp16/bf16
  engines come from a graph whose float weights, inputs, outputs and casts are fp16/bf16. The same
  is done for TensorRT, so an engine's precision is exactly its graph's types. Values beyond fp16's
  range (masking constants such as float32's minimum) are clipped to +-65504.
- one optimization profile covers every dynamic axis, named by the graph's dim_params.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from promptmux.core.durable import write_durably
from promptmux.core.families import family_of
from promptmux.core.trt_compat import EngineError
from promptmux.kernels.tensorrt_plugin import (
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

MANIFEST = "manifest.json"  # = export.deploy.MANIFEST (not imported: that module pulls in torch)
PRECISIONS = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP16_MAX = 65504.0


# ---- the graph copy --------------------------------------------------------------------------

def _mpt_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == PLUGIN_NAMESPACE and n.op_type == PLUGIN_NAME]


def _check_graph(model: onnx.ModelProto, path: Path, use_plugin: bool) -> None:
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx", PLUGIN_NAMESPACE)})
    if foreign:
        raise EngineError(f"{path} holds ONNX Runtime-specific operators TensorRT cannot import "
                          f"({', '.join(foreign)}); they come from the export's offline ONNX Runtime optimization. "
                          "Re-export the deployment with `promptmux export --no-optimize` "
                          "(export_deployment(..., optimize=False)) for TensorRT")
    if use_plugin and not _mpt_nodes(model):
        raise EngineError(f"{path} has no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} node for the plugin to replace (the "
                          "offline ONNX Runtime optimization inlines it). Re-export with `promptmux export "
                          "--no-optimize`, or build with use_plugin=False")


def _mark_plugin_nodes(model: onnx.ModelProto, use_plugin: bool) -> None:
    """Ask the parser for the plugin (or, without the attributes, the node's ONNX function body)."""
    for node in _mpt_nodes(model):
        keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(keep)
        if use_plugin:
            node.attribute.extend([helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                                   helper.make_attribute("plugin_version", PLUGIN_VERSION)])


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def _retyped_tensor(t: onnx.TensorProto, to: int) -> onnx.TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)
    if to == TensorProto.FLOAT16:
        return numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)
    out = TensorProto(name=t.name, dims=a.shape, data_type=TensorProto.BFLOAT16)
    out.raw_data = _to_bf16_bits(a).tobytes()
    return out


def _retype_graph(model: onnx.ModelProto, to: int) -> None:
    """Make every float32 of the graph `to` (fp16/bf16): weights, inputs, outputs, constants and casts."""
    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_retyped_tensor(t, to))
    for v in (*g.input, *g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = to
    del g.value_info[:]  # intermediate types: TensorRT infers them
    nodes = list(g.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = to
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_retyped_tensor(a.t, to))
        if node.op_type == "ConstantOfShape" and not node.attribute:  # default value: float32 zero
            node.attribute.append(helper.make_attribute("value", helper.make_tensor("value", to, [1], [0])))


def _reexport_portable(deploy_dir: Path, graph: str, tmp: Path, why: EngineError) -> Path:
    """The deployment's full-sequence graph exported again from its base model without ONNX Runtime's offline
    optimization (standard ops only, the MPT node kept), into tmp. The base model must be the one the
    deployment was exported from (config hash checked); otherwise raise `why` with what to do."""
    manifest = json.loads((deploy_dir / MANIFEST).read_text())
    base = Path(manifest.get("base", {}).get("path", ""))
    if graph != manifest.get("graph", {}).get("file") or not (base / "config.json").is_file():
        raise EngineError(f"{why} (the base model folder recorded at export, {str(base)!r}, is not there to "
                          "export a portable graph from)") from None
    from transformers import AutoConfig

    from promptmux.core.folder import config_hash, load_base_model
    from promptmux.core.graph import PromptedBackbone

    from .onnx_export import export_onnx

    config = AutoConfig.from_pretrained(str(deploy_dir))
    if config_hash(AutoConfig.from_pretrained(str(base))) != manifest["base"].get("config_sha256"):
        raise EngineError(f"{why} (the base model at {base} is no longer the one this deployment was exported "
                          "from, so no portable graph can be made from it)") from None
    return export_onnx(PromptedBackbone(load_base_model(base, config)), config, tmp / graph)


# ---- the optimization profile ------------------------------------------------------------------

def _profile_ranges(dim_names: set[str], lo: int, max_batch: int, max_seq: int, max_prompt: int, max_rank: int,
                    max_past: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for every named axis. The graphs' sums must hold at min, opt and max alike:
    length = mpt_tokens + prompt_tokens + tokens, prefix_plus_length = prefix (or past) + length."""
    base = {"batch": (1, max_batch), "tokens": (lo, max_seq), "prompt_tokens": (lo, max_prompt),
            "mpt_tokens": (lo, max_prompt), "prefix_tokens": (lo, max_prompt), "mpt_tasks": (1, max_batch),
            "mpt_shared_prompts": (1, max_batch), "mpt_rank": (1, max_rank), "past_length": (0, max_past)}
    r = {k: (mn, max(mn, (mn + mx + 1) // 2), mx) for k, (mn, mx) in base.items()}

    def total(*names):
        return tuple(sum(r[n][k] for n in names if n in dim_names) for k in range(3))

    r["length"] = total("mpt_tokens", "prompt_tokens", "tokens")
    r["prefix_plus_length"] = tuple(a + b for a, b in zip(total("prefix_tokens", "past_length"), r["length"]))
    return r


def _input_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Graph input -> its axes: an int for a fixed axis, the dim_param for a named one, None if unnamed."""
    inits = {t.name for t in model.graph.initializer}
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input if v.name not in inits}


def _add_profile(trt, builder, config, network, dims: dict[str, list], ranges: dict, path: Path) -> dict:
    profile = builder.create_optimization_profile()
    used = {}
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        shapes = [[], [], []]
        for axis, d in enumerate(dims[name]):
            if isinstance(d, int):
                for s in shapes:
                    s.append(d)
                continue
            if d not in ranges:
                raise EngineError(f"input {name!r} of {path} has a dynamic axis {axis} "
                                  f"{'named ' + repr(d) if d else 'without a name'}; build_engine knows ranges for "
                                  f"{', '.join(sorted(ranges))} only")
            used[d] = list(ranges[d])
            for s, v in zip(shapes, ranges[d]):
                s.append(v)
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    return used


# ---- build -------------------------------------------------------------------------------------

def _plugin_layers(trt, network) -> list[str]:
    """Names of the network's MPTPromptConcat plugin layers."""
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # get_layer() hands out the base class
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        if (core.plugin_name, core.plugin_namespace) == (PLUGIN_NAME, PLUGIN_NAMESPACE):
            found.append(layer.name)
    return found


def _allow_attention_decomposition(trt, network) -> int:
    """Let TensorRT build the graph's ONNX `Attention` nodes from standard layers where it has no dedicated kernel
    for their shape and type (fp32 on most GPUs, and any ahead-of-time build): a fused kernel is still chosen
    where one exists. Returns how many attention blocks were marked."""
    marked = set()
    boundary = {getattr(trt.LayerType, n) for n in ("ATTENTION_INPUT", "ATTENTION_OUTPUT") if hasattr(trt.LayerType, n)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in boundary:
            layer.__class__ = trt.IAttentionBoundaryLayer  # get_layer() hands out the base class
            attention = layer.attention
            attention.decomposable = True
            marked.add(attention.name)
    return len(marked)


def build_engine(deploy_dir, precision: str = "fp32", max_batch: int = 8, max_seq: int = 128,
                 max_prompt: int = 32, use_plugin: bool = True, out_name: str = "model.engine", *,
                 graph: str = "model.onnx", max_rank: int = 64, max_past: int = 256, trt=None) -> dict:
    """Build a TensorRT engine from deploy_dir/graph and write it to deploy_dir/out_name.

    Returns the build settings for the manifest (see record_engine). max_prompt bounds each kind of
    virtual tokens (prompt, MPT, prefix); max_rank the MPT rank; max_past the cached decoder's past.
    """
    from promptmux.core import trt_compat
    from promptmux.kernels.tensorrt_plugin import register_tensorrt_plugins

    deploy_dir = Path(deploy_dir)
    path = deploy_dir / graph
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build_engine takes a deployment folder written by "
                                "promptmux export")
    trt = trt or trt_compat.import_tensorrt()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=deploy_dir) as tmp:
        model = onnx.load(str(path), load_external_data=False)
        source = graph
        try:
            _check_graph(model, path, use_plugin)
        except EngineError as not_portable:
            # ONNX Runtime's offline optimization made the graph ORT-only: export it again, unoptimized.
            path = _reexport_portable(deploy_dir, graph, Path(tmp), not_portable)
            model = onnx.load(str(path), load_external_data=False)
            _check_graph(model, path, use_plugin)
            source = f"{graph} re-exported from the base model without ONNX Runtime's optimization"
        _mark_plugin_nodes(model, use_plugin)
        dims = _input_dims(model)
        if use_plugin:
            register_tensorrt_plugins(trt)
            trt_compat.prepare_plugin_parser(trt)  # else TensorRT-RTX's parser may abort the process

        logger = trt_compat.make_logger(trt)
        try:
            builder = trt.Builder(logger)
        except Exception as e:  # TensorRT (not -RTX) cannot even create a builder without a GPU
            raise EngineError(f"{trt_compat.version(trt)} cannot create a builder here ({e}; "
                              f"{' '.join(logger.errors)}). TensorRT needs a CUDA GPU to build; TensorRT-RTX builds "
                              f"without one: {trt_compat.INSTALL['tensorrt_rtx']}") from e
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if precision == "fp32":
            # External weights are read relative to the path given with the bytes: no copy needed.
            ok = parser.parse(model.SerializeToString(), str(path))
        else:
            onnx.load_external_data_for_model(model, str(path.parent))
            _retype_graph(model, PRECISIONS[precision])
            copy = Path(tmp) / f"retyped-{graph}"
            onnx.save(model, str(copy), save_as_external_data=True, location=copy.name + ".data")
            ok = parser.parse_from_file(str(copy))
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f"TensorRT's ONNX parser rejected {path} ({precision}): " + "; ".join(errors))

        _allow_attention_decomposition(trt, network)
        plugins = _plugin_layers(trt, network)
        wanted = len(_mpt_nodes(model)) if use_plugin else 0
        if len(plugins) != wanted:
            raise EngineError(
                f"the network has {len(plugins)} {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin layers, expected {wanted}: "
                + ("the parser inlined the node's ONNX function instead of using the plugin (is it registered "
                   "in this TensorRT's plugin registry? see register_tensorrt_plugins)" if use_plugin else
                   "remove the plugin_namespace/plugin_version attributes from the node"))

        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names/info for the engine inspector
        lo = 0 if any(d == "past_length" for ds in dims.values() for d in ds) else 1  # the cached decoder's
        # prefill passes zero-length prompt axes; the full-sequence graph always gets one slot
        names = {d for ds in dims.values() for d in ds if isinstance(d, str)}
        ranges = _profile_ranges(names, lo, max_batch, max_seq, max_prompt, max_rank, max_past)
        profile = _add_profile(trt, builder, config, network, dims, ranges, path)
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {path}: " + "; ".join(logger.errors[-5:]))
    data = memoryview(plan)
    out = deploy_dir / out_name
    write_durably(out, data)  # readers see the old engine or the new one

    device = trt_compat.cuda_device()
    return {
        "file": out_name,
        "graph": graph,
        "graph_source": source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": data.nbytes,
        "tensorrt": trt_compat.describe(trt),
        "precision": precision,
        "profile": profile,
        "plugin": {"used": use_plugin, "op": f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}", "version": PLUGIN_VERSION,
                   "layers": plugins},
        "device": device or "ahead-of-time (no GPU)",
        "build_seconds": round(time.perf_counter() - started, 2),
    }


def record_engine(deploy_dir, settings: dict, key: str = "engine") -> None:
    """Add `key: settings` to deploy_dir/manifest.json (durably, under the deployment's lock)."""
    from promptmux.core.folder import update_manifest

    update_manifest(deploy_dir, key, settings)


def build_deployment_engines(deploy_dir, precision: str = "fp32", max_batch: int = 8, max_seq: int = 128,
                             max_prompt: int = 32, max_past: int = 256, use_plugin: bool = True,
                             decoder: bool = True, quiet: bool = False) -> dict:
    """model.engine, and decoder.engine for a causal LM's cached decoder graph; recorded in the manifest under
    "engines" ({"model": settings, "decoder": settings}). Returns that dict."""
    deploy_dir = Path(deploy_dir)
    manifest = json.loads((deploy_dir / MANIFEST).read_text())
    graphs = {"model": manifest["graph"]["file"]} if manifest["graph"]["file"] else {}  # none: generation only
    if decoder and manifest.get("decoder") and family_of(manifest["base"]["family"]).generation == "causal":
        graphs["decoder"] = manifest["decoder"]["file"]
    engines = {}
    for name, graph in graphs.items():
        if not quiet:
            print(f"building {name}.engine from {graph} ({precision})", flush=True)
        engines[name] = build_engine(deploy_dir, precision, max_batch, max_seq, max_prompt, use_plugin,
                                     f"{name}.engine", graph=graph, max_past=max_past)
    record_engine(deploy_dir, engines, key="engines")
    return engines
