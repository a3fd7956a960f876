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


def too_long(tokens: int, virtual_tokens: int, task: str, limit: int | None, new_tokens: int = 0,
             new_name: str = "max_new_tokens") -> str | None:
    """Why a row does not fit `limit` positions, or None when it fits: the one fit check of the runtime, the
    server and the benchmarks. A row uses its tokens, its task's virtual tokens and, when it generates after them,
    `new_tokens` more (named `new_name` in the message, as the caller's request names them)."""
    if not limit or tokens + virtual_tokens + new_tokens <= limit:
        return None
    new = f" + {new_name}={new_tokens}" if new_tokens else ""
    return (f"{tokens} tokens + {virtual_tokens} virtual tokens of task {task!r}{new} exceed the model's {limit} "
            "positions")


def pad_rows(rows, attention_mask, pad_id: int | None, side: str):
    """Token-id rows of different lengths (lists, as a caller writes them) as a padded array and its mask, the
    way a tokenizer pads them. A rectangular array, or any input with a mask, is returned as it was given."""
    import numpy as np

    if attention_mask is not None or isinstance(rows, np.ndarray) or not isinstance(rows, (list, tuple)):
        return rows, attention_mask
    try:
        lengths = {len(r) for r in rows}
    except TypeError:  # not a list of rows: _check_inputs says what is wrong
        return rows, attention_mask
    if len(lengths) <= 1:
        return rows, attention_mask
    width = max(lengths)
    ids = np.full((len(rows), width), pad_id or 0, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        try:
            ids[i, span] = row
        except (TypeError, ValueError):
            from .errors import InputError

            raise InputError(f"input_ids row {i} is not a list of token ids") from None
        mask[i, span] = 1
    return ids, mask
