"""Prompt kinds: one module per way PEFT feeds a learned prompt to the model.

Every module in this package that defines `KIND` (a promptmux.kinds.base.PromptKind) is registered when the package
is imported: adding a kind is adding a module. Nothing outside this package branches on a task's kind; it asks the
kind (`kind_of(task)`) instead.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import PromptKind

KINDS: dict[str, PromptKind] = {}
BY_PEFT_TYPE: dict[str, PromptKind] = {}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    _kind = getattr(importlib.import_module(f"{__name__}.{_module}"), "KIND", None)
    if _kind is not None:
        KINDS[_kind.name] = _kind
        for _peft_type in _kind.peft_types:
            BY_PEFT_TYPE[_peft_type] = _kind


def get(name: str) -> PromptKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown prompt kind {name!r}; promptmux knows {', '.join(sorted(KINDS))}") from None


def kind_of(task) -> PromptKind:
    """The kind that reads, stores and places this task."""
    return get(task.kind)


def as_cache(task, kv):
    """The task seen through its precomputed key/values kv [layers, 2, kv_heads, T, head_dim] (a causal LM's
    virtual tokens never depend on the text after them): placed as a key/value prefix, positions after it."""
    from promptmux.core.task import Task

    from .prefix import KIND as prefix

    return Task(task.name, prefix.name, task.peft_type, kv.shape[3], {"prefix": kv})


def peft_types() -> list[str]:
    """Every PEFT method promptmux serves."""
    return list(BY_PEFT_TYPE)


__all__ = ["KINDS", "PromptKind", "as_cache", "get", "kind_of", "peft_types"]
