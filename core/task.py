"""`Task`: one servable task, the same type from the adapter reader through the bank to the graph's feeds."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Task:
    """One task's prompt (and classification head), as float32 numpy arrays.

    kind names the promptmux.kinds module that reads, stores and places it; `tensors` holds that kind's roles
    (e.g. "prompt" [T, d], "prefix" [L, 2, kv_heads, n, head_dim], MPT's "shared"/"cols"/"rows").
    head: the classification-head parameters the adapter saved ("classifier.weight" -> array); a task read back
    from the bank carries the resolved head in `layers` (weight, bias, archs.HeadLayer per head layer, the base model's
    parameters where the task saved none).
    """

    name: str
    kind: str
    peft_type: str
    num_virtual_tokens: int
    tensors: dict[str, np.ndarray]
    head: dict[str, np.ndarray] = field(default_factory=dict)
    labels: list[str] | None = None
    source: str = ""
    layers: list[tuple[np.ndarray, np.ndarray | None, object]] = field(default_factory=list)
    version: int = 0  # read from a bank: the version its store stamped when the task was written (0: not stored)


MAX_NAME = 128  # characters of a task (adapter) name: every entry point takes it, /v1/classify up to 256 with MPT's /k


def task_name(name) -> str:
    """A task name as a plain str: names arrive as numpy strings too (a column of a DataFrame, np.array(["pt"])),
    and a str subclass would carry its repr (np.str_('pt')) into every message and key built from it. In Unicode's
    NFC form: "café" typed with a combining accent (as macOS file names and some keyboards give it) names the same
    task as with a precomposed é, as a user reads them."""
    if isinstance(name, str):
        return unicodedata.normalize("NFC", str(name))
    if isinstance(name, bytes):
        raise TypeError(f"task names are text, got bytes {name!r}; decode them first")
    raise TypeError(f"a task name must be a string, got {type(name).__name__} {name!r}")


def same_prompt(a: Task, b: Task) -> bool:
    """Whether two tasks hold the very same prompt: the same task as one write stored it (its name and version; a
    view read again after the bank's cache let it go is the same), or the very same arrays. This tells a task still
    as it was from one replaced since (for what was built from it: a folded graph, a prompt's key/values)."""
    if a is b or (a.version and a.version == b.version and a.name == b.name):
        return True
    return (a.kind == b.kind and a.tensors.keys() == b.tensors.keys()
            and all(a.tensors[k] is b.tensors[k] for k in a.tensors))
