"""The calibration batches of a classifier: the rows a precision's contract is measured on (precision.py) and the
rows NNCF calibrates OpenVINO's int8 on (openvino_int8.py), made the same way for both."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

CALIBRATION_ROWS = 256  # generated classifier inputs when the user gives none (one flip in 256 stays above 0.995)


def item_lines(items: list) -> list[str]:
    """Calibration items as the deployment keeps them: a text per line, or, where some are rows per task, every item
    a JSON line (a text among them as {"text": ...}, so that the file reads back as it was given)."""
    rows = any(isinstance(t, dict) for t in items)
    return [t if not rows else json.dumps(t if isinstance(t, dict) else {"text": t}, ensure_ascii=False, sort_keys=True)
            for t in items]


def items_digest(items: list) -> str:
    """The identity of calibration items: what a contract, and an int8 IR calibrated on them, were made from."""
    return hashlib.sha256("\n".join(item_lines(items)).encode()).hexdigest()


def generated_ids(rt: Runtime, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (avoiding the first ids, where special tokens live) when no texts are given."""
    rng = np.random.default_rng(seed)
    vocab = rt.dims.vocab_size
    low = min(1000, vocab // 2)
    ids = rng.integers(low, vocab, size=(rows, length))
    return ids, np.ones_like(ids)


def classifier_batches(rt: Runtime, texts, task: str, size: int = 32):
    """(ids, mask, token types) batches of the calibration texts for one task (cut to fit its positions), or of
    generated ids."""
    if texts is None:
        ids, mask = generated_ids(rt, CALIBRATION_ROWS, 24)
        return [(ids[i:i + size], mask[i:i + size], None) for i in range(0, len(ids), size)]
    batches = []
    for i in range(0, len(texts), size):
        enc = rt.encode(texts[i:i + size], task, truncation=True)
        batches.append((enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")))
    return batches
