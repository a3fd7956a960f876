"""Deployments written before the task store kept their bank in one safetensors file (`bank.safetensors`: the
tensors, and the task index in the file's metadata). Such a bank opens in memory; its first persisted change
migrates it to the store (core/folder.py migrate_bank)."""

from __future__ import annotations

import json
from pathlib import Path

from .archs import ArchSpec
from .task import Task

LEGACY_FILE = "bank.safetensors"
LEGACY_INDEX_KEY = "promptmux_tasks"


def load_legacy(bank_class, folder: Path, spec: ArchSpec, cache_bytes: int):
    """The bank of `folder`/bank.safetensors, in memory (a bank_class, PromptBank)."""
    from safetensors import safe_open

    path = folder / LEGACY_FILE
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if LEGACY_INDEX_KEY not in meta:
            raise ValueError(f"{path} has no task index; it was not written by promptmux")
        index = json.loads(meta[LEGACY_INDEX_KEY])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    base = {k[len("base/head/"):]: v for k, v in arrays.items() if k.startswith("base/head/")}
    bank = bank_class(spec, base, cache_bytes=cache_bytes)
    bank.add([Task(name, e["kind"], e["peft_type"], e["num_virtual_tokens"],
                   {role: arrays[key] for role, key in e["tensors"].items()},
                   head={p: arrays[key] for p, key in e.get("head", {}).items()}, labels=e.get("labels"),
                   source=e.get("source", "")) for name, e in index.items()])
    return bank
