"""The checks an adapter's reader and every kind share (core/adapters.py reads the folder; promptmux.kinds reads
each method's tensors): one error type, and one wording for a size that does not fit the base model."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class AdapterError(ValueError):
    """An adapter directory cannot be served with this base model; the message says why and what to do."""


def config_int(cfg: dict, key: str, adapter_dir: Path, required: bool = False) -> int | None:
    """A size from adapter_config.json: a positive integer (absent or null: None, unless required)."""
    value = cfg.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
        got = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise AdapterError(f"adapter_config.json of {str(adapter_dir)!r}: {key} must be a positive integer, got "
                           f"{got}; re-save the adapter with PEFT")
    return value


def expect(what: str, adapter_value, base_value, adapter_dir: Path, expected_from: str = "the base model") -> None:
    if adapter_value is not None and adapter_value != base_value:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} does not fit the base model: {what} is {adapter_value} in the adapter "
            f"but {base_value} in {expected_from}"
        )


def expect_shape(what: str, tensor: np.ndarray, shape: tuple, adapter_dir: Path) -> None:
    expect(f"{what} shape", tuple(tensor.shape), shape, adapter_dir,
            expected_from="what adapter_config.json and the base model's sizes imply")
