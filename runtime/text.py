"""Text in: the deployment's tokenizer, and the one rule for text that does not fit the model's positions."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(deploy_dir: str | Path):
    """The deployment's tokenizer. Its "Token indices sequence length is longer than ..." warning is turned off:
    promptmux checks every row against the model's positions itself (see too_long), with the row's task."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(deploy_dir))
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True  # "already warned"
    return tok


def too_long(tokens: int, virtual_tokens: int, task: str, limit: int | None) -> str | None:
    """Why a row of `tokens` tokens for `task` does not fit `limit` positions, or None when it fits."""
    if not limit or tokens + virtual_tokens <= limit:
        return None
    return f"{tokens} tokens + {virtual_tokens} virtual tokens of task {task!r} exceed the model's {limit} positions"
