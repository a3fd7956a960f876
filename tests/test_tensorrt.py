"""TensorRT engines built ahead of time from tiny deployments (prompt tuning, prefix tuning, MPT), with and
without the MPTPromptConcat plugin.

Builds need TensorRT-RTX (pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs), which builds
without a GPU; running an engine needs a GPU that TensorRT accepts, so those tests skip elsewhere with
trt_compat's reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest
from conftest import adapter_configs, make_adapter, make_base, random_batch

from promptmux.core import trt_compat

try:
    TRT = trt_compat.import_tensorrt()
except ImportError as e:
    pytest.skip(f"no TensorRT here: {e}", allow_module_level=True)

from promptmux.core.trt_compat import EngineError  # noqa: E402
from promptmux.export.trt_engine import (  # noqa: E402
    PRECISIONS,
    _profile_ranges,
    _retype_graph,
    build_deployment_engines,
    build_engine,
    record_engine,
)
from promptmux.kernels.tensorrt_plugin import (  # noqa: E402
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    plugin_classes,
    register_tensorrt_plugins,
)
from promptmux.runtime.trt_session import load_engine  # noqa: E402

CAN_RUN, WHY_NOT = trt_compat.execution_support()
needs_gpu = pytest.mark.skipif(not CAN_RUN, reason=f"engines cannot run here: {WHY_NOT}")
AOT_ONLY = trt_compat.flavor(TRT) == "tensorrt_rtx"
ADAPTERS = ("pt", "prefix", "mpt")  # prompt tuning, prefix tuning, MPT (3 tasks)


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def deploy(request, tmp_path_factory):
    """A deployment exported without the ONNX Runtime optimization (it keeps the MPT node, no contrib ops)."""
    from promptmux import export_deployment

    arch, root = request.param, tmp_path_factory.mktemp(f"trt-{request.param}")
    base = make_base(arch, root / "base")
    cfgs = adapter_configs(arch)
    adapters = {n: make_adapter(arch, base, cfgs[n], root / "adapters" / n, seed=i + 1) for i, n in enumerate(ADAPTERS)}
    return export_deployment(base, adapters, root / "deploy", optimize=False, quiet=True)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "no-plugin"])
def test_engine_builds_ahead_of_time(deploy, use_plugin):
    graph_before = _sha(deploy / "model.onnx")
    s = build_engine(deploy, "fp32", max_batch=4, max_seq=16, max_prompt=8, use_plugin=use_plugin,
                     out_name=f"fp32-{use_plugin}.engine")
    engine = deploy / s["file"]
    assert engine.is_file() and s["bytes"] == engine.stat().st_size > 0 and s["sha256"] == _sha(engine)
    assert _sha(deploy / "model.onnx") == graph_before  # ONNX Runtime keeps its graph as it was
    assert s["plugin"]["used"] is use_plugin
    assert s["plugin"]["layers"] == (["node_mpt_prompt_concat"] if use_plugin else [])
    # The plan stores the plugin's namespace to find its creator when loading; without the plugin, the
    # node's function body becomes standard layers and the namespace appears nowhere.
    assert (PLUGIN_NAMESPACE.encode() in engine.read_bytes()) is use_plugin
    assert s["tensorrt"] == trt_compat.describe(TRT)
    if trt_compat.cuda_device() is None:
        assert s["device"] == "ahead-of-time (no GPU)"
    # The profile: every named axis, and the sums the graph checks hold at max.
    p = s["profile"]
    assert p["batch"] == [1, 3, 4] and p["tokens"][2] == 16 and p["mpt_rank"][0] == 1
    assert p["length"][2] == p["mpt_tokens"][2] + p["prompt_tokens"][2] + p["tokens"][2] == 32
    assert p["prefix_plus_length"][2] == p["prefix_tokens"][2] + p["length"][2] == 40


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_engines_keep_the_plugin(deploy, precision):
    s = build_engine(deploy, precision, max_batch=2, max_seq=8, max_prompt=8, out_name=f"{precision}.engine")
    assert s["precision"] == precision and s["plugin"]["layers"] == ["node_mpt_prompt_concat"]
    assert not list(deploy.glob(".trt-build-*"))  # the retyped copy of the graph is gone


def test_fp16_graph_copy_matches_fp32_in_onnxruntime(deploy):
    """The graph an fp16 engine is built from computes what model.onnx does (checked on the CPU)."""
    import onnxruntime as ort

    from promptmux import Runtime
    from promptmux.core.archs import position_offset
    from promptmux.core.layout import build_layout

    rt = Runtime(deploy)
    ids, mask = random_batch(rt.config.model_type, rows=len(rt.tasks), seq=7, seed=3, padding_side="left")
    feeds = build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None,
                         [rt.bank.view(t) for t in rt.tasks], rt.dims).feeds
    want = ort.InferenceSession(str(deploy / "model.onnx")).run(None, feeds)[0]
    model = onnx.load(str(deploy / "model.onnx"))
    _retype_graph(model, PRECISIONS["fp16"])
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    got = ort.InferenceSession(model.SerializeToString()).run(None, half)[0]
    assert got.dtype == np.float16 and not np.isnan(got).any()  # masking constants were clipped, not -inf
    assert float(np.abs(got.astype(np.float32) - want).max()) < 2e-3


def test_causal_lm_gets_a_decoder_engine_and_the_manifest_records_both(deploy):
    manifest = json.loads((deploy / "manifest.json").read_text())
    engines = build_deployment_engines(deploy, max_batch=2, max_seq=8, max_prompt=8, max_past=32, quiet=True)
    want = {"model", "decoder"} if manifest["base"]["family"] == "decoder" else {"model"}
    assert set(engines) == want
    for s in engines.values():
        assert (deploy / s["file"]).is_file() and s["plugin"]["layers"] == ["node_mpt_prompt_concat"]
    if "decoder" in engines:  # the prefill takes zero-length prompt axes; steps grow the past
        assert engines["decoder"]["profile"]["tokens"][0] == 0 and engines["decoder"]["profile"]["past_length"][2] == 32
    after = json.loads((deploy / "manifest.json").read_text())
    assert after["engines"] == engines and {k: v for k, v in after.items() if k != "engines"} == manifest


def test_record_engine_adds_settings_to_the_manifest(deploy, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(deploy / "manifest.json", folder / "manifest.json")
    before = json.loads((folder / "manifest.json").read_text())
    settings = {"file": "model.engine", "precision": "fp16", "tensorrt": {"flavor": "x", "version": "1"}}
    record_engine(folder, settings)
    after = json.loads((folder / "manifest.json").read_text())
    assert after.pop("engine") == settings and after == before
    from promptmux.core.folder import LOCK_FILE

    # no temp file left behind (the lock file that serialises manifest changes stays)
    assert sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) == ["manifest.json"]


def test_engine_of_another_tensorrt_or_changed_file_is_refused(deploy):
    s = build_engine(deploy, "fp32", max_batch=2, max_seq=8, max_prompt=8, out_name="refuse.engine")
    path = deploy / s["file"]
    older = copy.deepcopy(s)
    older["tensorrt"]["version"] = "0.9.0"
    with pytest.raises(EngineError, match=r"built with tensorrt\S* 0\.9\.0 but this process uses .*rebuild"):
        load_engine(path, older)
    other = copy.deepcopy(s)
    other["tensorrt"]["flavor"] = "tensorrt" if AOT_ONLY else "tensorrt_rtx"
    with pytest.raises(EngineError, match="only loads in the TensorRT version that built it"):
        load_engine(path, other)
    changed = dict(s, sha256="0" * 64)
    with pytest.raises(EngineError, match="not the engine the manifest describes"):
        load_engine(path, changed)
    if not CAN_RUN:  # the right engine, on a machine that cannot run it: the reason, not a crash
        with pytest.raises(EngineError, match="cannot load .* here: " + re.escape(WHY_NOT[:20])):
            load_engine(path, s)


def test_parser_that_inlines_the_function_is_caught(deploy, monkeypatch):
    """Without the creator in the registry, the parser silently imports the function body: the build says so."""
    import promptmux.kernels.tensorrt_plugin as plugin

    registry = TRT.get_plugin_registry()
    creator = register_tensorrt_plugins(TRT)
    assert registry.deregister_creator(creator)
    monkeypatch.setattr(plugin, "register_tensorrt_plugins", lambda trt=None: None)
    try:
        with pytest.raises(EngineError, match="inlined the node's ONNX function instead of using the plugin"):
            build_engine(deploy, max_batch=2, max_seq=8, max_prompt=8, out_name="never.engine")
    finally:
        monkeypatch.undo()
        register_tensorrt_plugins(TRT)
    assert not (deploy / "never.engine").exists()


def test_optimized_graph_is_exported_again_from_the_base_model(deploy, tmp_path):
    """ONNX Runtime's offline optimization inlines the MPT node and adds contrib ops: the build re-exports a
    portable graph from the recorded base model; without that base it refuses and says what to do."""
    import gc

    from onnx import inliner

    gc.collect()  # earlier tests' runtimes closed now, not mid-copy (their store's -wal/-shm files vanish at close)
    folder = tmp_path / "inlined"
    shutil.copytree(deploy, folder, ignore=shutil.ignore_patterns("*.engine"))
    model = inliner.inline_local_functions(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    model.graph.node[0].domain = "com.microsoft"  # what ONNX Runtime's fusions leave in the graph
    onnx.save(model, str(folder / "model.onnx"))
    s = build_engine(folder, max_batch=2, max_seq=8, max_prompt=8, out_name="x.engine")
    assert s["plugin"]["layers"] == ["node_mpt_prompt_concat"] and "re-exported" in s["graph_source"]
    assert onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node[0].domain == "com.microsoft"

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["base"]["path"] = str(tmp_path / "moved-away")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="ONNX Runtime-specific operators .*com.microsoft.*--no-optimize.*not there"):
        build_engine(folder, use_plugin=False)
    model.graph.node[0].domain = ""
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(EngineError, match="no ai.mpt::MPTPromptConcat node .*--no-optimize"):
        build_engine(folder, out_name="x.engine")
    assert build_engine(folder, max_batch=2, max_seq=8, max_prompt=8, use_plugin=False)["plugin"]["layers"] == []


def test_profile_sums_hold_at_min_opt_and_max():
    names = {"batch", "tokens", "prompt_tokens", "mpt_tokens", "prefix_tokens", "length", "prefix_plus_length"}
    r = _profile_ranges(names, 1, 8, 128, 32, 64, 256)
    for k in range(3):
        assert r["length"][k] == r["mpt_tokens"][k] + r["prompt_tokens"][k] + r["tokens"][k]
        assert r["prefix_plus_length"][k] == r["prefix_tokens"][k] + r["length"][k]
    assert r["length"] == (3, 99, 192) and r["batch"][2] == 8


def test_plugin_build_time_interface():
    plugin_cls, creator_cls = plugin_classes(TRT)
    creator = creator_cls()
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (PLUGIN_NAME, PLUGIN_VERSION,
                                                                                PLUGIN_NAMESPACE)
    p = creator.create_plugin("mpt", TRT.PluginFieldCollection([]), TRT.TensorRTPhase.BUILD)
    assert isinstance(p, plugin_cls) and isinstance(p.clone(), plugin_cls) and p.clone() is not p
    assert isinstance(p.attach_to_context(None), plugin_cls)
    assert len(p.get_fields_to_serialize()) == 0
    i64, f32, f16, bf16 = TRT.DataType.INT64, TRT.DataType.FLOAT, TRT.DataType.HALF, TRT.DataType.BF16
    assert p.get_output_data_types([i64, i64, bf16, bf16, bf16, bf16]) == [bf16]

    def desc(dtype, fmt=TRT.TensorFormat.LINEAR):
        d, pd = TRT.DynamicPluginTensorDesc(), TRT.PluginTensorDesc()
        pd.type, pd.format = dtype, fmt
        d.desc = pd
        return d

    io = [desc(i64), desc(i64), desc(f16), desc(f16), desc(f16), desc(f16), desc(f16)]
    assert all(p.supports_format_combination(i, io, 6) for i in range(7))
    assert not p.supports_format_combination(3, io[:3] + [desc(f32)] + io[4:], 6)  # mixed float types
    assert not p.supports_format_combination(0, [desc(TRT.DataType.INT32)] + io[1:], 6)
    assert not p.supports_format_combination(2, io[:2] + [desc(TRT.DataType.INT8)] + io[3:], 6)
    assert not p.supports_format_combination(2, io[:2] + [desc(f16, TRT.TensorFormat.CHW32)] + io[3:], 6)


def test_registration_is_idempotent():
    first = register_tensorrt_plugins(TRT)
    assert register_tensorrt_plugins(TRT) is first
    assert TRT.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None


def test_compat_picks_the_imported_flavor_and_explains_conflicts(monkeypatch):
    assert trt_compat.import_tensorrt() is TRT
    assert trt_compat.version(TRT) == f"{trt_compat.flavor(TRT)} {TRT.__version__}"
    monkeypatch.setenv(trt_compat.ENV, "tensorrt" if AOT_ONLY else "tensorrt_rtx")
    with pytest.raises(ImportError, match="cannot be used in one process"):
        trt_compat.import_tensorrt()
    monkeypatch.setenv(trt_compat.ENV, "cuda")
    with pytest.raises(ImportError, match="not a TensorRT flavor"):
        trt_compat.import_tensorrt()


@pytest.mark.skipif(not AOT_ONLY, reason="the unversioned-library link is a TensorRT-RTX matter")
def test_plugin_parser_link_is_in_place():
    trt_compat.prepare_plugin_parser(TRT)
    folder = trt_compat._loaded_library_dir("libtensorrt_onnxparser_rtx.so")
    link = folder / trt_compat.RTX_LIB
    assert link.exists() and link.resolve().name == "libtensorrt_rtx.so.1"


def test_execution_support_gives_a_reason():
    ok, why = trt_compat.execution_support()
    if trt_compat.cuda_device() is None:  # a CPU machine: TensorRT-RTX builds engines, runs none
        assert ok is False and why.startswith("no CUDA GPU here") and why.endswith(
            "engines ahead of time on this machine" if AOT_ONLY else "engines on a machine with a GPU")
    else:
        assert why.startswith(trt_compat.version(TRT)) and (" runs engines on " in why) is ok
    if trt_compat.cuda_device() is None:
        assert not ok and "no CUDA GPU" in why


@needs_gpu
@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "no-plugin"])
def test_engine_matches_onnxruntime(deploy, use_plugin):
    import onnxruntime as ort
    import torch

    from promptmux import Runtime
    from promptmux.core.archs import position_offset
    from promptmux.core.layout import build_layout

    s = build_engine(deploy, "fp32", max_batch=8, max_seq=16, max_prompt=8, use_plugin=use_plugin,
                     out_name=f"run-{use_plugin}.engine")
    engine = load_engine(deploy / s["file"], s)
    rt = Runtime(deploy)
    ids, mask = random_batch(rt.config.model_type, rows=len(rt.tasks), seq=7, seed=3, padding_side="left")
    feeds = build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None,
                         [rt.bank.view(t) for t in rt.tasks], rt.dims).feeds
    want = ort.InferenceSession(str(deploy / "model.onnx")).run(None, feeds)[0]

    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    keep = {}
    for n in names:
        if engine.get_tensor_mode(n) == TRT.TensorIOMode.INPUT:
            keep[n] = torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda()
            assert context.set_input_shape(n, tuple(keep[n].shape))
    out_name = next(n for n in names if engine.get_tensor_mode(n) == TRT.TensorIOMode.OUTPUT)
    keep[out_name] = torch.empty(tuple(context.get_tensor_shape(out_name)), device="cuda")
    for n, t in keep.items():
        context.set_tensor_address(n, t.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    got = keep[out_name].cpu().numpy()
    assert float(np.abs(got - want).max()) < 5e-3  # TF32 matmuls allowed


@pytest.mark.skipif(CAN_RUN, reason="engines run here")
def test_tensorrt_runtime_says_why_it_cannot_run_here(deploy):
    from promptmux import BackendUnavailable, Runtime

    build_deployment_engines(deploy, max_batch=2, max_seq=8, max_prompt=8, max_past=16, quiet=True)
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run engines here: .+"):
        Runtime(deploy, backend="tensorrt")


@needs_gpu
def test_tensorrt_runtime_serves_mixed_batches_like_onnxruntime(deploy):
    from promptmux import Runtime

    build_deployment_engines(deploy, max_batch=8, max_seq=16, max_prompt=8, max_past=32, quiet=True)
    ort_rt, trt_rt = Runtime(deploy, use_folded=False), Runtime(deploy, backend="tensorrt")
    tasks = ort_rt.tasks
    ids, mask = random_batch(ort_rt.config.model_type, rows=len(tasks), seq=7, seed=5, padding_side="left")
    for want, got in zip(ort_rt.forward(ids, mask, tasks), trt_rt.forward(ids, mask, tasks)):
        assert float(np.abs(want - got).max()) < 1e-3
    if ort_rt.spec.family.generation == "causal":
        kw = dict(max_new_tokens=4, eos_token_id=[])
        feeds = {"input_ids": ids, "attention_mask": mask}
        assert [r["token_ids"] for r in trt_rt.generate(feeds, tasks, **kw)] == \
            [r["token_ids"] for r in ort_rt.generate(feeds, tasks, **kw)]
