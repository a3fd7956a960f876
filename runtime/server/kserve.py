"""The KServe v2 / Open Inference Protocol, the same engine behind it: each task is a model.

What a model takes and gives (both over HTTP, here, and over gRPC, kserve_grpc.py):
- classifiers: inputs `text` (BYTES [N], or [N, 1]) or `input_ids` (INT64 or INT32 [N, S]) with an optional
  `attention_mask` (same shape, 1 for real tokens); outputs `scores` (FP32 [N, labels], softmax), `label_id`
  (INT64 [N]) and `label` (BYTES [N]); a request may ask for a subset. Requests of every task and protocol share
  the scheduler's batches, with the same limits as /v1/classify (texts per request, text length, positions).
- causal LMs and seq2seq: Triton's generate extension, /v2/models/{task}/generate and generate_stream.
Errors answer {"error": "FIELD: what is wrong"} (the protocol's error body; api_errors.py) with 400, 404 (unknown task),
413 (body too large) or 503/504 as on /v1.
"""

from __future__ import annotations

import numpy as np

from .api_errors import ApiError
from .kserve_tensors import bad, parameters_of
from .schemas import MAX_TEXTS

VERSION = "1"  # every task has one version
CLASSIFIER_INPUTS = [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                     {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                     {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
OUTPUT_TYPES = {"scores": "FP32", "label_id": "INT64", "label": "BYTES"}
ID_TYPES = (np.int64, np.int32)


def metric_task(engine, task: str) -> str:
    """The task as a metrics label: only a task the bank holds (a client cannot create label values)."""
    return task if task in engine.rt.bank else ""


def server_metadata() -> dict:
    from promptmux import __version__

    return {"name": "promptmux", "version": __version__, "extensions": ["binary_tensor_data", "generate"]}


def check_version(version: str | None) -> None:
    if version not in (None, "", VERSION):
        raise ApiError(404, "unknown_version", "model_version", f"model_version: only version {VERSION} is served")


def check_model(engine, task: str, field: str = "model_name") -> None:
    """404 unless the task is served: a task of the bank, or a generating deployment's served name (its base model,
    which /v1/completions and the generate extension answer with no prompt)."""
    if not (engine.family.generation and task == engine.served_name):
        engine.capture(task, field)


def model_metadata(engine, task: str) -> dict:
    check_model(engine, task)
    if not engine.family.classifies:  # served through the generate extension
        inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]
    else:
        view = engine.capture(task, "model_name")
        # the head's last layer has one row per label (weights [out, in], as torch's Linear keeps them)
        labels = len(view.labels) if view.labels else int(view.layers[-1][0].shape[0]) if view.layers else -1
        inputs = CLASSIFIER_INPUTS
        outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1, labels]},
                   {"name": "label_id", "datatype": "INT64", "shape": [-1]},
                   {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return {"name": task, "versions": [VERSION], "platform": f"promptmux_{engine.family.name}", "inputs": inputs,
            "outputs": outputs}


def _rows(engine, view, arrays: dict[str, np.ndarray]):
    """(token ids per row, token type ids or None) from the request's input tensors."""
    known = {"text", "input_ids", "attention_mask"}
    for name in arrays:
        if name not in known:
            raise bad(f"inputs[{name!r}]", f"unknown input; a classifier takes {', '.join(sorted(known))}")
    if ("text" in arrays) == ("input_ids" in arrays):
        raise bad("inputs", "give exactly one of text (BYTES [N]) or input_ids (INT64 [N, S])")
    if "text" in arrays:
        text = arrays["text"]
        if "attention_mask" in arrays:
            raise bad("inputs['attention_mask']", "goes with input_ids, not with text")
        if text.dtype != np.object_:
            raise bad("inputs['text'].datatype", "text is BYTES")
        if text.ndim == 2 and text.shape[1] == 1:
            text = text[:, 0]
        if text.ndim != 1 or not 1 <= len(text) <= MAX_TEXTS:
            raise bad("inputs['text'].shape", f"give [N] (or [N, 1]) texts, N from 1 to {MAX_TEXTS}")
        texts = []
        for i, t in enumerate(text):
            try:
                texts.append(t.decode("utf-8"))
            except UnicodeDecodeError:
                raise bad(f"inputs['text'][{i}]", "text is UTF-8") from None
        return engine.encode(texts, view, "text", False)
    ids = arrays["input_ids"]
    if ids.dtype not in ID_TYPES:
        raise bad("inputs['input_ids'].datatype", "input_ids are INT64 (or INT32)")
    if ids.ndim != 2 or not 1 <= ids.shape[0] <= MAX_TEXTS or ids.shape[1] < 1:
        raise bad("inputs['input_ids'].shape", f"give [N, S]: N rows from 1 to {MAX_TEXTS}, S tokens")
    mask = arrays.get("attention_mask")
    if mask is None:
        mask = np.ones_like(ids)
    elif mask.dtype not in ID_TYPES:
        raise bad("inputs['attention_mask'].datatype", "attention_mask is INT64 (or INT32)")
    elif mask.shape != ids.shape:
        raise bad("inputs['attention_mask'].shape", f"{list(mask.shape)} is not input_ids' {list(ids.shape)}")
    elif not np.isin(mask, (0, 1)).all():
        raise bad("inputs['attention_mask']", "holds 1 for a real token and 0 for padding")
    vocab = engine.rt.dims.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise bad("inputs['input_ids']", f"token ids run from 0 to {vocab - 1} for this model")
    rows = [[int(x) for x in row[m == 1]] for row, m in zip(ids, mask)]
    from ..text import too_long

    for i, row in enumerate(rows):
        if not row:
            raise bad(f"inputs['input_ids'][{i}]", "the row has no real token (attention_mask all 0)")
        refused = too_long(len(row), view.num_virtual_tokens, view.name, engine.max_positions)
        if refused:
            raise bad(f"inputs['input_ids'][{i}]", refused)
    return rows, None


def requested_outputs(request: dict) -> list[tuple[str, bool]]:
    """(output name, binary) for each output the request asks for (all of them when it names none)."""
    binary_all = bool(parameters_of(request, "body").get("binary_data_output", False))
    asked = request.get("outputs")
    if asked is None:
        return [(name, binary_all) for name in OUTPUT_TYPES]
    if not isinstance(asked, list):
        raise bad("outputs", "give the outputs as a list of {name}")
    out = []
    for i, o in enumerate(asked):
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUT_TYPES:
            raise bad(f"outputs[{i}].name", f"{name!r} is not an output; one of {', '.join(OUTPUT_TYPES)}")
        out.append((name, bool(parameters_of(o, f"outputs[{i}]").get("binary_data", binary_all))))
    return out


async def infer(engine, task: str, arrays: dict[str, np.ndarray], wanted: list[str], wait) -> dict[str, np.ndarray]:
    """Classify one v2 request on the shared scheduler: {output name: array} for the outputs wanted."""
    if not engine.family.classifies:
        raise ApiError(400, "invalid_request", "model_name",
                       "model_name: this deployment generates text: use /v2/models/{task}/generate")
    view = engine.capture(task, "model_name")
    ids, types = _rows(engine, view, arrays)
    results = await engine.classify(ids, types, view, wait)
    out = {}
    if "scores" in wanted:
        out["scores"] = np.array([r["scores"] for r in results], dtype=np.float32)
    if "label_id" in wanted:
        out["label_id"] = np.array([r["label_id"] for r in results], dtype=np.int64)
    if "label" in wanted:
        out["label"] = np.array([r["label"].encode() for r in results], dtype=np.object_)
    return out
