"""The ONNX Runtime deployment answers every task exactly as PEFT eager does (fp32, 1e-4).

For each architecture one deployment holds every prompt kind: prompt tuning, P-tuning (MLP
and LSTM), prefix tuning (with and without projection; not DistilBERT, which PEFT cannot
prefix-tune) and two MPT adapters of different sizes and ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import adapter_configs, is_encoder, random_batch

from promptmux import Runtime

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama"]
TOL = 1e-4


def _adapter_cases():
    """Single-task batches on one architecture, for diagnosis: the mixed batches below check every task of every
    architecture row by row already."""
    return [("llama", name) for name in adapter_configs("llama")]


def _max_diff(got, want) -> float:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("deployment,adapter", _adapter_cases(), indirect=["deployment"],
                         ids=[f"{a}-{n}" for a, n in _adapter_cases()])
def test_single_task_batch_matches_peft(deployment, adapter):
    rt = deployment.runtime()
    side = "right" if is_encoder(deployment.arch) else "left"
    ids, mask = random_batch(deployment.arch, rows=4, seq=9, seed=11, padding_side=side)
    tasks = [t for t in deployment.task_names() if t == adapter or t.startswith(adapter + "/")]
    assert tasks
    for task in tasks:
        got = rt.forward(ids, mask, [task] * len(ids))
        assert _max_diff(got, deployment.reference(task, ids, mask)) < TOL, task


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("deployment", ARCHS, indirect=True)
def test_mixed_batch_of_all_tasks_matches_peft_row_by_row(deployment, padding_side, backend):
    rt = deployment.runtime(backend)
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=2 * len(names) + 1, seq=8, seed=5, padding_side=padding_side)
    rng = np.random.default_rng(3)
    tasks = list(rng.permutation([names[i % len(names)] for i in range(len(ids))]))
    got = rt.forward(ids, mask, tasks)
    for name in names:
        rows = [i for i, t in enumerate(tasks) if t == name]
        want = deployment.reference(name, ids[rows], mask[rows])
        assert _max_diff([got[i] for i in rows], want) < TOL, name


@pytest.mark.parametrize("deployment", ARCHS, indirect=True)
def test_tasks_give_different_outputs(deployment):
    """Guards the comparisons above: the prompts really change what the model computes."""
    rt = deployment.runtime()
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=1, seq=6, seed=2, padding_side="right")
    outs = [rt.forward(ids, mask, [n])[0] for n in names]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert float(np.abs(outs[i] - outs[j]).max()) > 1e-3, (names[i], names[j])


@pytest.mark.parametrize("deployment", ["bert", "llama"], indirect=True)
def test_torch_reference_backend_matches_onnxruntime(deployment):
    ort_rt, torch_rt = deployment.runtime(), deployment.runtime("torch")
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=len(names), seq=7, seed=9, padding_side="left")
    assert _max_diff(ort_rt.forward(ids, mask, names), torch_rt.forward(ids, mask, names)) < TOL


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_causal_lm_rows_exclude_virtual_tokens_and_padding(deployment):
    rt = deployment.runtime()
    ids, mask = random_batch("gpt2", rows=3, seq=7, seed=1, padding_side="left")
    out = rt.forward(ids, mask, ["pt", "prefix", "mpt/1"])
    assert [o.shape for o in out] == [(int(m.sum()), rt.dims.vocab_size) for m in mask]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_token_type_ids_are_honoured_like_peft(deployment):
    """BERT sentence pairs: PEFT prepends type 0 for virtual tokens and passes types through for prefixes."""
    import torch
    from peft import PeftModel

    from promptmux.core.folder import load_base_model

    rt = deployment.runtime()
    ids, mask = random_batch("bert", rows=2, seq=8, seed=4, padding_side="right")
    types = np.zeros_like(ids)
    types[:, 4:] = 1
    for task in ("pt", "prefix"):
        got = rt.forward(ids, mask, [task, task], token_type_ids=types)
        model = PeftModel.from_pretrained(load_base_model(deployment.base), deployment.adapters[task]).eval()
        with torch.inference_mode():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         token_type_ids=torch.from_numpy(types)).logits.numpy()
        assert _max_diff(got, list(want)) < TOL
        # and the types matter
        assert float(np.abs(got[0] - rt.forward(ids, mask, [task, task])[0]).max()) > 1e-4


@pytest.mark.parametrize("deployment", ["bert", "gpt2"], indirect=True)
def test_attention_is_one_fused_node_per_layer_in_the_graph_and_in_each_engine(deployment, tmp_path):
    """Opset 23's standard Attention op: one node per layer in model.onnx, which ONNX Runtime keeps as its own
    kernel and OpenVINO compiles into one fused subgraph per layer (no loose attention MatMul/Softmax left); in an
    encoder's graph without prefix inputs, on the 3-D projections, with no head transposes (attention_3d.py)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    layers = Runtime(deployment.deploy, backend="onnxruntime").dims.num_layers
    graph = onnx.load(str(deployment.deploy / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in graph.graph.node if n.domain in ("", "ai.onnx"))
    assert ops["Attention"] == layers and ops["Softmax"] == 0 and ops["IsNaN"] == 0

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(deployment.deploy / "model.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "ort.onnx"), load_external_data=False)
    assert sum(n.op_type == "Attention" for n in optimized.graph.node) == layers

    compiled = deployment.runtime("openvino").session.compiled
    kinds = Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops())
    assert kinds["Subgraph"] >= layers and kinds["Softmax"] == 0, kinds
    noprefix = deployment.deploy / "model_noprefix.onnx"
    assert noprefix.exists() == (deployment.arch == "bert")  # an encoder's graph for batches without a prefix
    if noprefix.exists():  # its attention on the 3-D projections
        graph = onnx.load(str(noprefix), load_external_data=False).graph
        three_d = [n for n in graph.node if n.op_type == "Attention" and "q_num_heads" in {a.name for a in n.attribute}]
        assert len(three_d) == layers and not [n for n in graph.node if n.op_type == "Transpose"]


@pytest.mark.parametrize("deployment", ["bert", "gpt2"], indirect=True)
def test_an_encoder_classifier_runs_its_last_layer_on_the_pooled_position_only(deployment):
    """BERT's head reads position 0: after the last layer's keys and values, its graphs compute that position only
    (export/pooled_row.py; the output projection and the feed-forward block, and with 3-D attention the query and
    the attention too). A causal LM's graph, with logits at every position, keeps every position."""
    from collections import Counter

    import onnx

    from promptmux.export.pooled_row import SUFFIX

    moved = {}
    for graph in sorted(deployment.deploy.glob("model*.onnx")):
        nodes = onnx.load(str(graph), load_external_data=False).graph.node
        moved[graph.name] = Counter(n.op_type for n in nodes if n.output[0].endswith(SUFFIX))
    if deployment.arch == "gpt2":
        assert moved == {"model.onnx": Counter()}
        return
    assert set(moved) == {"model.onnx", "model_noprefix.onnx"}
    assert moved["model.onnx"]["MatMul"] == 3 and not moved["model.onnx"]["Attention"]  # 4-D: from the output
    assert moved["model_noprefix.onnx"]["MatMul"] == 4 and moved["model_noprefix.onnx"]["Attention"] == 1


@pytest.mark.parametrize("deployment", ["roberta", "llama"], indirect=True)
def test_single_kind_batches_on_openvino_match_peft(deployment):
    """A batch of one kind leaves the other slot groups empty: the CPU engines then get zero-length axes instead
    of masked dummy slots (runtime/batch.py). OpenVINO must give PEFT's rows there too (ONNX Runtime is covered by
    the single-task tests above)."""
    rt = deployment.runtime("openvino")
    side = "right" if is_encoder(deployment.arch) else "left"
    ids, mask = random_batch(deployment.arch, rows=3, seq=7, seed=13, padding_side=side)
    for task in ("pt", "prefix", "mpt/1", "cartridge"):
        got = rt.forward(ids, mask, [task] * len(ids))
        assert _max_diff(got, deployment.reference(task, ids, mask)) < TOL, task
