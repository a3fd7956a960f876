"""The batch core of the runtime: one full-sequence batch from layout to session to heads (`run_batch`, used by
`Runtime.forward` and the server's scheduler), labels from logits, and the helpers around it: padding rows into a
batch, splitting rows into batches that fit the positions, a session made on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from promptmux.core.task import Task, task_name

from .errors import InputError

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime


def erf(x: np.ndarray) -> np.ndarray:
    """The error function in numpy (Abramowitz & Stegun 7.1.26: within 1.5e-7, below float32's resolution)."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def activation(x: np.ndarray, name: str | None) -> np.ndarray:
    if name is None:
        return x
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":  # transformers' "gelu": exact, through erf
        return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(x.dtype)
    raise ValueError(f"unknown head activation {name!r}")


def apply_head(view: Task, features: np.ndarray) -> np.ndarray:
    """The task's classification head (a few small layers: linear, or a LayerNorm) on backbone features [n, d]."""
    x = features.astype(np.float32)
    for weight, bias, layer in view.layers:
        if layer.op == "layer_norm":
            x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + layer.eps) * weight
        else:
            x = x @ weight.T
        if bias is not None:
            x = x + bias
        x = activation(x, layer.activation)
    return x


def pad_rows(rows: list[dict], pad_id: int, side: str) -> dict[str, np.ndarray]:
    """One batch from rows of different lengths, as the tokenizer pads (ids with pad_id, mask and type ids 0)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        padded = [[fill] * (width - len(r[key])) for r in rows]
        out[key] = np.array([p + list(r[key]) if side == "left" else list(r[key]) + p for r, p in zip(rows, padded)],
                            dtype=np.int64)
    return out


def pad_ragged(ids, mask, pad_id: int | None, side: str):
    """Rows of token ids of different lengths (lists, as a caller writes them) as a padded array and its mask. A
    rectangular array, or ids that come with a mask, are returned as given (the input checks judge them)."""
    if mask is not None or not isinstance(ids, (list, tuple)):
        return ids, mask
    try:
        if len({len(r) for r in ids}) <= 1:
            return ids, mask
        padded = pad_rows([{"input_ids": list(r), "attention_mask": [1] * len(r)} for r in ids], pad_id or 0, side)
    except (TypeError, ValueError):
        return ids, mask  # not rows of integers: the input checks say what is wrong
    return padded["input_ids"], padded["attention_mask"]


def task_names(tasks: str | Sequence[str], rows: int, what: str = "texts") -> list[str]:
    """One task for every row, or one per row (numpy arrays of names too), as plain strings."""
    try:
        names = [task_name(tasks)] * rows if isinstance(tasks, str) else [task_name(t) for t in tasks]
    except TypeError as e:
        raise InputError(f"{e}; give one task name, or one per row") from None
    if len(names) != rows:
        raise InputError(f"got {len(names)} task names for {rows} {what}; give one task, or one per row")
    return names


def round_robin(queues: Sequence[Sequence]) -> list:
    """One item of each queue in turn until every queue is empty: how mixed traffic is modelled (each batch holds
    rows of every task) by the contract, OpenVINO's int8 calibration and the accuracy benchmark."""
    return [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]


def fitting_groups(lengths: list[int], virtual: list[int], limit: int | None) -> list[list[int]]:
    """Rows in order, split into batches whose padded width plus each row's virtual tokens fits limit."""
    groups: list[list[int]] = []
    width = most_virtual = 0
    for i, (n, v) in enumerate(zip(lengths, virtual)):
        if groups and (not limit or max(width, n) + max(most_virtual, v) <= limit):
            groups[-1].append(i)
            width, most_virtual = max(width, n), max(most_virtual, v)
        else:
            groups.append([i])
            width, most_virtual = n, v
    return groups


def run_batch(rt: Runtime, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None, views: list[Task],
              bank_key=None) -> list[np.ndarray]:
    """One full-sequence batch where row i uses views[i]: its layout, the session that serves it, its outputs.

    Returns one array per row: classification -> that task's head on the features [num_labels]; causal LM ->
    logits of the row's real tokens [real_tokens, vocab] (virtual tokens and padding excluded). bank_key: device
    sessions keep the prompt inputs resident under it (None when rows come from different bank versions).

    The Runtime picks the graph (`Runtime.graph_for`) and builds its feeds (`Runtime.layout`; both say why);
    this function runs it and reads the outputs.
    """
    session, graph = rt.graph_for(views)
    layout = rt.layout(graph, ids, mask, types, views)
    out = session.run(layout.feeds, bank_key=bank_key)
    ran = getattr(session, "graph_file", graph)  # the file that ran: model.int8.onnx at int8
    # OpenVINO's model compiled for this batch's shape (openvino_session.py) counted apart from the dynamic one
    rt.graph_runs[f"{ran} (shape-specialised)" if getattr(session, "ran_static", False) else ran] += 1
    if rt.spec.family.classifies:
        return heads(views, out)
    seq = ids.shape[1]
    return [out[i, s: s + seq][mask[i].astype(bool)] for i, s in enumerate(layout.token_start)]


def heads(views: list[Task], features: np.ndarray) -> list[np.ndarray]:
    """Each row's task head on its features, one head call per distinct task view of the batch (by identity: a
    server batch may hold a task as it was and as it is after a replace)."""
    results: list[np.ndarray | None] = [None] * len(views)
    groups: dict[int, list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(id(v), []).append(i)
    for rows in groups.values():
        for j, logits in zip(rows, apply_head(views[rows[0]], features[rows])):
            results[j] = logits
    return results


def label_scores(view: Task, logits: np.ndarray) -> dict:
    """A classification row as the API gives it: {"label", "label_id", "scores" (softmax, label order)}. A head of
    one output (transformers' regression, a cross-encoder's relevance) scores its raw value: a softmax over one
    output is always 1."""
    if len(logits) == 1:
        return {"label": view.labels[0] if view.labels else "0", "label_id": 0, "scores": [float(logits[0])]}
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    label_id = int(logits.argmax())
    return {"label": view.labels[label_id] if view.labels else str(label_id), "label_id": label_id,
            "scores": [float(x) for x in scores]}

