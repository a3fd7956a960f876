"""Adapters sent in an admin request instead of read from the server's disk (POST /v1/tasks/upload).

Each adapter's two files arrive in the JSON body (adapter_config.json as JSON, adapter_model.safetensors as
base64); the body's size was capped before it was read (--max-body-bytes). They are written to a private
temporary folder and read by the same reader as a folder on disk (core/adapters.py load_adapter: every check,
safetensors only, nothing unpickled), and the folder is removed whatever happens.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
from pathlib import Path

from .api_errors import ApiError


def read_uploads(items: list[dict], base_config) -> list:
    """Every uploaded adapter's tasks, all read before any is added; a refusal names the item and its field."""
    from promptmux.core.adapters import AdapterError, load_adapter

    tasks = []
    for i, item in enumerate(items):
        where = f"tasks[{i}]"
        if "/" in item["name"] or item["name"].strip() != item["name"] or not item["name"].isprintable():
            raise ApiError(400, "invalid_request", f"{where}.name",
                           "a task name has no '/', surrounding spaces or control characters")
        try:
            weights = base64.b64decode(item["adapter_model"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_request", f"{where}.adapter_model",
                           "not base64: send adapter_model.safetensors encoded with the standard alphabet") from None
        folder = Path(tempfile.mkdtemp(prefix="promptmux-upload-"))
        try:
            (folder / "adapter_config.json").write_text(json.dumps(item["adapter_config"]))
            (folder / "adapter_model.safetensors").write_bytes(weights)
            if item.get("labels") is not None:
                (folder / "labels.json").write_text(json.dumps(item["labels"]))
            try:
                read = load_adapter(item["name"], folder, base_config, root=folder)
            except AdapterError as e:
                weights_words = ("safetensors", "tensor", "prompt_embeddings", "weights", "shape", "head")
                field = "adapter_model" if any(w in str(e) for w in weights_words) else "adapter_config"
                raise ApiError(400, "invalid_request", f"{where}.{field}",
                               str(e).replace(str(folder), "<upload>")) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        for t in read:
            t.source = "upload"
        tasks += read
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ApiError(400, "invalid_request", "tasks", "two uploaded adapters give the same task name")
    return tasks
