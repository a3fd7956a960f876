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
    return [(arch, name) for arch in ARCHS for name in adapter_configs(arch)]


def _max_diff(got, want) -> float:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


def _runtime(fx, backend="onnxruntime"):
    key = f"_rt_{backend}"
    if not hasattr(fx, key):
        setattr(fx, key, Runtime(fx.deploy, backend=backend))
    return getattr(fx, key)


@pytest.mark.parametrize("deployment,adapter", _adapter_cases(), indirect=["deployment"],
                         ids=[f"{a}-{n}" for a, n in _adapter_cases()])
def test_single_task_batch_matches_peft(deployment, adapter):
    rt = _runtime(deployment)
    side = "right" if is_encoder(deployment.arch) else "left"
    ids, mask = random_batch(deployment.arch, rows=4, seq=9, seed=11, padding_side=side)
    tasks = [t for t in deployment.task_names() if t == adapter or t.startswith(adapter + "/")]
    assert tasks
    for task in tasks:
        got = rt.forward(ids, mask, [task] * len(ids))
        assert _max_diff(got, deployment.reference(task, ids, mask)) < TOL, task


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("deployment", ARCHS, indirect=True)
def test_mixed_batch_of_all_tasks_matches_peft_row_by_row(deployment, padding_side):
    rt = _runtime(deployment)
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
    rt = _runtime(deployment)
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=1, seq=6, seed=2, padding_side="right")
    outs = [rt.forward(ids, mask, [n])[0] for n in names]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert float(np.abs(outs[i] - outs[j]).max()) > 1e-3, (names[i], names[j])


@pytest.mark.parametrize("deployment", ["bert", "llama"], indirect=True)
def test_torch_reference_backend_matches_onnxruntime(deployment):
    ort_rt, torch_rt = _runtime(deployment), _runtime(deployment, "torch")
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=len(names), seq=7, seed=9, padding_side="left")
    assert _max_diff(ort_rt.forward(ids, mask, names), torch_rt.forward(ids, mask, names)) < TOL


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_causal_lm_rows_exclude_virtual_tokens_and_padding(deployment):
    rt = _runtime(deployment)
    ids, mask = random_batch("gpt2", rows=3, seq=7, seed=1, padding_side="left")
    out = rt.forward(ids, mask, ["pt", "prefix", "mpt/1"])
    assert [o.shape for o in out] == [(int(m.sum()), rt.dims.vocab_size) for m in mask]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_token_type_ids_are_honoured_like_peft(deployment):
    """BERT sentence pairs: PEFT prepends type 0 for virtual tokens and passes types through for prefixes."""
    import torch
    from peft import PeftModel

    from promptmux.export.deploy import load_base_model

    rt = _runtime(deployment)
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
def test_softmax_nan_guards_dropped_only_from_encoder_graphs(deployment):
    """An encoder query always sees its row's prompt keys, so the exporter's NaN guard after softmax is dead
    work there; a causal graph's left-pad queries see no key at all and keep it."""
    import json

    import onnx

    graph = onnx.load(str(deployment.deploy / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    report = json.loads((deployment.deploy / "manifest.json").read_text())["graph"]["ort_optimization"]
    if is_encoder(deployment.arch):
        assert report["softmax_nan_guards"]["kept"] and report["softmax_nan_guards"]["dropped"] >= 2
        assert "IsNaN" not in ops
    else:
        assert "softmax_nan_guards" not in report
        assert ops.count("IsNaN") >= 2


def test_nan_guard_removal_rewires_only_the_exact_pattern():
    import onnx
    from onnx import TensorProto, helper

    from promptmux.export.onnx_export import drop_softmax_nan_guards

    def model(fill):
        nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("IsNaN", ["p"], ["nan"]),
                 helper.make_node("Where", ["nan", "fill", "p"], ["g"]), helper.make_node("Relu", ["g"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                                  [helper.make_tensor("fill", TensorProto.FLOAT, [], [fill])])
        return helper.make_model(graph)

    m = model(0.0)
    assert drop_softmax_nan_guards(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Softmax", "Relu"] and list(m.graph.node[1].input) == ["p"]
    onnx.checker.check_model(m)
    m = model(1.0)  # not a zero fill: not the guard, left alone
    assert drop_softmax_nan_guards(m) == 0 and len(m.graph.node) == 4
