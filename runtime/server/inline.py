"""Per-request soft prompts (serve --allow-inline-prompts): a completion for the deployment's base model (its served
name) may carry its own input-level prompt, `prompt_embeds`, instead of naming a stored task.

Wire format: {"shape": [T, hidden], "dtype": "float32" | "bfloat16", "data": base64 of the little-endian values}.
Everything is checked before the payload is decoded (the body's size was capped before it was read): the hidden
size against the model's, T against the positions, and the payload's length against the declared shape, so a
small payload never allocates a large tensor (vLLM's CVE-2025-62164 trusted torch.load and declared shapes). The
values must be finite. The prompt becomes a task that no bank holds: its rows join the same mixed batches, and its
key/values are computed for the request and never cached. Without prompt_embeds the served name runs the bare base
model (no soft prompt), a baseline for the tasks.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from promptmux.core.task import Task

from .api_errors import ApiError

ITEMSIZE = {"float32": 4, "bfloat16": 2}


def inline_task(name: str, embeds, hidden: int, max_positions: int | None) -> Task:
    """The request's prompt as an input-level task (embeds: the request's prompt_embeds, or None for none)."""
    from promptmux.kinds import BY_PEFT_TYPE

    kind = BY_PEFT_TYPE["PROMPT_TUNING"]
    if embeds is None:
        return Task(name, kind.name, "PROMPT_TUNING", 0, {"prompt": np.zeros((0, hidden), np.float32)})
    t, width = embeds.shape
    if width != hidden:
        raise ApiError(400, "invalid_request", "prompt_embeds.shape",
                       f"hidden size {width}, but this model's is {hidden}: send [T, {hidden}]")
    if t < 1 or (max_positions and t >= max_positions):
        raise ApiError(400, "invalid_request", "prompt_embeds.shape",
                       f"{t} virtual tokens: give 1 to {max_positions - 1 if max_positions else 'any'} "
                       "(the text and max_tokens need positions too)")
    want = t * hidden * ITEMSIZE[embeds.dtype]
    data = embeds.data
    pad = len(data) - len(data.rstrip("="))
    if len(data) % 4 or len(data) // 4 * 3 - pad != want:
        raise ApiError(400, "invalid_request", "prompt_embeds.data",
                       f"the payload is not the {want} bytes of a {embeds.dtype} [{t}, {hidden}] tensor "
                       "(base64 of the little-endian values, standard alphabet, padded)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_request", "prompt_embeds.data", "not base64 (standard alphabet)") from None
    if embeds.dtype == "float32":
        values = np.frombuffer(raw, "<f4").astype(np.float32)
    else:  # bfloat16: the high half of a float32
        values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    if not np.isfinite(values).all():
        raise ApiError(400, "invalid_request", "prompt_embeds.data", "holds NaN or infinite values")
    return Task(name, kind.name, "PROMPT_TUNING", t, {"prompt": values.reshape(t, hidden)})
