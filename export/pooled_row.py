"""A classifier's last layers computed only at the position its head reads.

An encoder classifier's head reads one position of the last hidden state (BERT's pooler, RoBERTa's and DeBERTa's
heads: `hidden[:, 0]`), a Gather at the end of the exported graph. Everything after the last attention's keys and
values (the query projection, attention over one query, the output projection, the feed-forward block and its
LayerNorms) works row by row, so the other positions' values are computed only to be thrown away: 10 of the last
layer's 12 hidden x hidden matrix products, about a seventh of MiniLM-L6's work. This pass moves that Gather up the
graph as far as the values are row-wise and used nowhere else, so those nodes run on one row per sequence; the
attention keeps every key and value, and takes its mask's row for that query. The result is the same arithmetic on
the same values for the position read (rounding can differ where a kernel blocks a one-row product differently).

Written on the ONNX graph, not the PyTorch model: one pass serves every family whose head reads a fixed position,
and what it may cross is a short list of row-wise ops (ROW_WISE), checked against the value shapes the exporter
records. A graph it does not fit (mean pooling, a causal classifier's last-token index that depends on the mask,
a language model's logits at every position) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that compute each position from that position alone (on the tensors of [batch, positions, ...] among their
# inputs; their other inputs, weights and biases, are used as they are).
ROW_WISE = {"Add", "Sub", "Mul", "Div", "MatMul", "Gelu", "Relu", "Tanh", "Erf", "Sigmoid", "Cast", "Identity",
            "LayerNormalization", "RMSNormalization", "Softmax"}
SUFFIX = "__pooled"


def _shapes(graph: onnx.GraphProto) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.value_info, *graph.input, *graph.output) if v.type.HasField("tensor_type")}


def _constant(graph: onnx.GraphProto, name: str):
    for init in graph.initializer:
        if init.name == name and not init.external_data:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
    return None


def _last_axis(node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis in (-1, 2)


def keep_pooled_row(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (see the module's comment); returns how many nodes now run on the pooled row only."""
    graph = model.graph
    shapes = _shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    # The head's read: Gather(hidden [batch, positions, hidden], a constant position, axis=1).
    reads = [n for n in graph.node if n.op_type == "Gather" and next((a.i for a in n.attribute if a.name == "axis"),
                                                                      0) == 1]
    if len(reads) != 1:
        return 0
    read = reads[0]
    index = _constant(graph, read.input[1])
    hidden = shapes.get(read.input[0])
    if index is None or index.ndim != 0 or not hidden or len(hidden) != 3:
        return 0
    positions = hidden[1]

    def rows(name: str) -> bool:  # a [batch, positions, ...] tensor, or [1, positions, ...]
        shape = shapes.get(name)
        return bool(shape) and len(shape) == 3 and shape[1] == positions

    initializers = {i.name: len(i.dims) for i in graph.initializer}

    def rank(name: str) -> int | None:
        if name in shapes:
            return len(shapes[name])
        if name in initializers:
            return initializers[name]
        value = _constant(graph, name)
        return None if value is None else value.ndim

    def passable(node: onnx.NodeProto) -> bool:
        if node.op_type == "Attention":  # the 3-D form (export/attention_3d.py), not causal; keys and values whole
            attributes = {a.name: a for a in node.attribute}
            mask = shapes.get(node.input[3]) if len(node.input) > 3 and node.input[3] else [1, 1, 1, 1]
            return ("q_num_heads" in attributes and not (attributes.get("is_causal") and attributes["is_causal"].i)
                    and len(node.input) <= 4 and not any(node.output[1:]) and rows(node.input[0])
                    and bool(mask) and len(mask) == 4 and mask[2] in (1, positions))
        if node.op_type not in ROW_WISE or len(node.output) != 1 or not rows(node.output[0]):
            return False
        if node.op_type in ("LayerNormalization", "RMSNormalization", "Softmax") and not _last_axis(node):
            return False
        if node.op_type == "MatMul":  # rows times a weight
            return rows(node.input[0]) and rank(node.input[1]) == 2
        return all(rows(i) or (rank(i) is not None and rank(i) <= 1) for i in node.input if i)

    # The nodes to rewrite: passable, reached backwards from the read, and every output used only by them (or read).
    chosen: list[onnx.NodeProto] = []
    frontier = [read.input[0]]
    seen = set()
    while frontier:
        name = frontier.pop()
        node = producer.get(name)
        if node is None or id(node) in seen or not passable(node):
            continue
        seen.add(id(node))
        chosen.append(node)
        frontier += [node.input[0]] if node.op_type == "Attention" else [i for i in node.input if rows(i)]
    ids = {id(n) for n in chosen}
    while True:  # drop a node whose output something outside the set also uses
        keep = [n for n in chosen if all(o not in outputs and all(id(c) in ids or c is read
                                                                  for c in consumers.get(o, [])) for o in n.output)]
        if len(keep) == len(chosen):
            break
        chosen, ids = keep, {id(n) for n in keep}
    if not any(n.op_type == "MatMul" for n in chosen):
        return 0

    index_name = f"{read.output[0]}{SUFFIX}_position"
    graph.initializer.append(numpy_helper.from_array(np.array([int(index)], dtype=np.int64), index_name))
    order = {id(n): i for i, n in enumerate(graph.node)}
    new: list[onnx.NodeProto] = []
    sliced: dict[str, str] = {}

    def row_of(name: str, axis: int = 1) -> str:  # a value made outside the set: Gather its row (kept as an axis)
        if (name, axis) not in sliced:
            sliced[name, axis] = f"{name}{SUFFIX}{'' if axis == 1 else axis}"
            new.append(helper.make_node("Gather", [name, index_name], [sliced[name, axis]], axis=axis,
                                        name=f"{name}/pooled_row"))
        return sliced[name, axis]

    for node in sorted(chosen, key=lambda n: order[id(n)]):
        inputs = list(node.input)
        for k, name in enumerate(inputs):
            if not name or (node.op_type == "Attention" and k > 0 and k < 3):
                continue  # an attention's keys and values: every position
            if node.op_type == "Attention" and k == 3:
                if shapes[name][2] == positions:  # [batch, heads, queries, keys]: this query's row
                    inputs[k] = row_of(name, axis=2)
                continue
            if rows(name):
                inputs[k] = name + SUFFIX if id(producer.get(name)) in ids else row_of(name)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField("input")
        copy.input.extend(inputs)
        copy.ClearField("output")
        copy.output.extend(o + SUFFIX for o in node.output)
        copy.name = (node.name or node.output[0]) + SUFFIX
        new.append(copy)

    read.input[0] = read.input[0] + SUFFIX
    read.input[1] = _scalar_zero(graph, read)
    kept = [n for n in graph.node if id(n) not in ids]
    at = next(i for i, n in enumerate(kept) if n is read)
    graph.ClearField("node")
    graph.node.extend(kept[:at] + new + kept[at:])
    gone = {o for n in chosen for o in n.output}
    for vi in [v for v in graph.value_info if v.name in gone]:
        graph.value_info.remove(vi)
    return len(chosen)


def _scalar_zero(graph: onnx.GraphProto, read: onnx.NodeProto) -> str:
    """The read now takes row 0 of the one row left per sequence."""
    name = f"{read.output[0]}{SUFFIX}_first"
    graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), name))
    return name
