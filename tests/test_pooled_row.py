"""export/pooled_row.py on small hand-written graphs: which nodes move to the pooled row, what stops the move, and
the same outputs as before (the exported models' own checks are in test_fidelity and test_families)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from promptmux.export.pooled_row import SUFFIX, keep_pooled_row

H, F, HEADS = 4, 6, 2


def _model(nodes, extra_outputs=(), values=()) -> onnx.ModelProto:
    """hidden [batch, positions, H] (and mask [batch, 1, positions, positions]) -> ... -> Gather(position 0)."""
    rng = np.random.default_rng(0)
    weights = {"w1": (H, F), "b1": (F,), "w2": (F, H), "scale": (H,), "bias": (H,), "wq": (H, H), "wo": (H, H)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    inits.append(numpy_helper.from_array(np.array(0, dtype=np.int64), "first"))
    rows = lambda n, k=H: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "positions", k])  # noqa: E731
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "positions", "positions"])
    graph = helper.make_graph(
        [*nodes, helper.make_node("Gather", ["normed", "first"], ["pooled"], axis=1)], "g", [rows("hidden"), mask],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", H]), *(rows(o) for o in extra_outputs)],
        inits, value_info=[rows(n, k) for n, k in values])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


FFN = [helper.make_node("MatMul", ["hidden", "w1"], ["up"]), helper.make_node("Add", ["up", "b1"], ["biased"]),
       helper.make_node("Gelu", ["biased"], ["act"]), helper.make_node("MatMul", ["act", "w2"], ["down"]),
       helper.make_node("Add", ["down", "hidden"], ["residual"]),
       helper.make_node("LayerNormalization", ["residual", "scale", "bias"], ["normed"], axis=-1)]
FFN_VALUES = [("up", F), ("biased", F), ("act", F), ("down", H), ("residual", H), ("normed", H)]


def _run(model: onnx.ModelProto, hidden, mask):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["pooled"], {"hidden": hidden, "mask": mask})[0]


def _feeds(batch=3, positions=5):
    rng = np.random.default_rng(1)
    mask = rng.random((batch, 1, positions, positions)) < 0.7
    mask[..., 0] = True  # every query sees a key
    return rng.standard_normal((batch, positions, H)).astype(np.float32), mask


def _moved(model) -> dict[str, list[str]]:
    return {n.op_type: [i for i in n.input] for n in model.graph.node if n.output[0].endswith(SUFFIX)}


def test_a_feed_forward_block_runs_on_the_pooled_row_with_the_same_result():
    before = _model(FFN, values=FFN_VALUES)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert keep_pooled_row(after) == 6
    onnx.checker.check_model(after)
    moved = _moved(after)
    assert set(moved) == {"MatMul", "Add", "Gelu", "LayerNormalization", "Gather"}  # the input's row: one Gather
    assert not any(n.output[0] in {"up", "act", "normed"} for n in after.graph.node)  # the whole-row nodes are gone
    hidden, mask = _feeds()
    np.testing.assert_allclose(_run(after, hidden, mask), _run(before, hidden, mask), atol=1e-6)


def test_a_value_used_elsewhere_stays_whole():
    """The last LayerNorm's output is also a graph output: every position of it is wanted, so nothing moves."""
    model = _model(FFN, extra_outputs=["normed"], values=FFN_VALUES[:-1])
    assert keep_pooled_row(model) == 0 and not _moved(model)


def test_a_node_that_mixes_positions_stops_the_move_below_it():
    """CumSum over the positions is not row-wise: the block above it moves, and takes its output's row."""
    nodes = [helper.make_node("CumSum", ["hidden", "axis"], ["summed"]), *(
        helper.make_node(n.op_type, [("summed" if i == "hidden" else i) for i in n.input], n.output,
                         **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in FFN)]
    model = _model(nodes, values=[("summed", H), *FFN_VALUES])
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "axis"))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert keep_pooled_row(model) == 6
    assert any(n.op_type == "CumSum" and not n.output[0].endswith(SUFFIX) for n in model.graph.node)
    hidden, mask = _feeds()
    np.testing.assert_allclose(_run(model, hidden, mask), _run(before, hidden, mask), atol=1e-6)


@pytest.mark.parametrize("is_causal", [0, 1])
def test_attention_takes_one_query_with_its_mask_row_and_every_key(is_causal):
    """Q from the rows, K and V from every position, the mask's row for the query; a causal attention (whose one
    query would be taken for the last position) does not move."""
    nodes = [helper.make_node("MatMul", ["hidden", "wq"], ["q"]),
             helper.make_node("Attention", ["q", "hidden", "hidden", "mask"], ["attended"], q_num_heads=HEADS,
                              kv_num_heads=HEADS, is_causal=is_causal),
             helper.make_node("MatMul", ["attended", "wo"], ["projected"]),
             helper.make_node("LayerNormalization", ["projected", "scale", "bias"], ["normed"], axis=-1)]
    model = _model(nodes, values=[("q", H), ("attended", H), ("projected", H), ("normed", H)])
    if is_causal:
        model.graph.node[1].input[3] = ""  # a causal attention takes no mask here
    before = onnx.ModelProto()
    before.CopyFrom(model)
    moved = keep_pooled_row(model)
    hidden, mask = _feeds()
    np.testing.assert_allclose(_run(model, hidden, mask), _run(before, hidden, mask), atol=1e-5)
    if is_causal:
        assert moved == 2 and "Attention" not in _moved(model)  # the projection and the norm after it only
        return
    assert moved == 4
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert attention.input[0] == "q" + SUFFIX and attention.input[1:3] == ["hidden", "hidden"]
    assert attention.input[3] == "mask" + SUFFIX + "2"  # axis 2: the query's row of the mask
