"""The prompt bank: every task's prompt (and classification head) in one safetensors file.

Layout of `bank.safetensors`:
    task/<name>/<role>            each tensor of the task's kind (promptmux.kinds), e.g. prompt [T, d],
                                  prefix [L, 2, kv, n, hd], MPT's cols [T, r] and rows [r, d]
    shared/<digest>               the roles a kind shares between tasks (MPT's shared prompt [T, d]),
                                  stored once per distinct value
    task/<name>/head/<param>      per-task classification head (PEFT modules_to_save)
    base/head/<param>             the base model's head, for modules a task did not save
The task index lives in the file's metadata, so one atomic rename updates tensors and index
together: a reader sees the old bank or the new one, never half of each.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .archs import ArchSpec
from .folder import durable_replace
from .task import Task, task_name

BANK_FILE = "bank.safetensors"
INDEX_KEY = "promptmux_tasks"


class UnknownTaskError(LookupError):
    """A request named a task the bank does not hold."""

    def __str__(self) -> str:  # LookupError would print the repr of the message
        return str(self.args[0])


LISTED_IN_ERRORS = 10  # an unknown-task error lists the served tasks up to this many, else counts them


class PromptBank:
    def __init__(self, spec: ArchSpec, base_head: dict[str, np.ndarray] | None = None):
        self.spec = spec
        self.index: dict[str, dict] = {}
        self.arrays: dict[str, np.ndarray] = {f"base/head/{k}": v for k, v in (base_head or {}).items()}
        self._views: dict[str, Task] = {}

    # ---- queries -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.index)

    def unknown(self, name: str) -> UnknownTaskError:
        """The error for a task the bank does not hold: its name, and the served ones while they are few (a bank
        of per-user prompts would otherwise put every name into every error)."""
        n = len(self.index)
        if n <= LISTED_IN_ERRORS:
            return UnknownTaskError(f"unknown task {name!r}; this deployment serves: {', '.join(self.index) or 'none'}")
        return UnknownTaskError(f"unknown task {name!r}; this deployment serves {n:,} tasks (`promptmux tasks DIR "
                                "list` or GET /v1/models lists them)")

    def page(self, limit: int, after: str | None = None) -> tuple[list[str], bool]:
        """Up to `limit` task names in the bank's order after the name `after` (a cursor: the last name of the
        previous page), and whether more follow. An unknown cursor is an UnknownTaskError."""
        names = list(self.index)
        start = 0
        if after is not None:
            if after not in self.index:
                raise UnknownTaskError(f"unknown task {after!r} as the page cursor `after`; pass the last name of "
                                       "the previous page, or no cursor for the first page")
            start = names.index(after) + 1
        return names[start:start + limit], start + limit < len(names)

    def view(self, name: str) -> Task:
        name = task_name(name)  # views are cached by name: a numpy string must not name the cached Task
        if name not in self.index:
            raise self.unknown(name)
        if name not in self._views:
            self._views[name] = self._make_view(name)
        return self._views[name]

    def _make_view(self, name: str) -> Task:
        e = self.index[name]
        layers = []
        for layer in self.spec.head:
            params = []
            for p in ("weight", "bias"):
                key = e.get("head", {}).get(f"{layer.module}.{p}", f"base/head/{layer.module}.{p}")
                params.append(self.arrays.get(key))
            if params[0] is None:
                raise ValueError(f"task {name!r}: no weights for head module {layer.module!r}")
            layers.append((params[0], params[1], layer))
        return Task(name=name, kind=e["kind"], peft_type=e["peft_type"], num_virtual_tokens=e["num_virtual_tokens"],
                    tensors={role: self.arrays[key] for role, key in e["tensors"].items()}, labels=e.get("labels"),
                    source=e.get("source", ""), layers=layers)

    def holds(self, view: Task) -> bool:
        """Whether the bank still holds this very task (the same prompt arrays under its name): a bank copy shares
        unchanged tasks' arrays, and a replaced or removed task's are gone. O(1): no view is built, nothing hashed."""
        e = self.index.get(view.name)
        return (e is not None and e["kind"] == view.kind and e["tensors"].keys() == view.tensors.keys()
                and all(self.arrays.get(key) is view.tensors[role] for role, key in e["tensors"].items()))

    def digest(self, name: str) -> str:
        """A fingerprint of one task's prompt and head tensors (detects a task replaced under its name)."""
        e = self.index[name]
        h = hashlib.sha256()
        for key in sorted(list(e["tensors"].values()) + list(e["head"].values())):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        return h.hexdigest()

    def describe(self, names: list[str] | None = None) -> list[dict]:
        """One JSON-able row per task (for manifests and `promptmux tasks list`); names: only these."""
        rows = []
        for name in self.index if names is None else names:
            e = self.index[name]
            shapes = {role: list(self.arrays[key].shape) for role, key in e["tensors"].items()}
            row = {"name": name, "kind": e["kind"], "peft_type": e["peft_type"],
                   "num_virtual_tokens": e["num_virtual_tokens"], "shapes": shapes, "dtype": "float32",
                   "source": e.get("source", "")}
            if self.spec.head:
                view = self.view(name)
                row["num_labels"] = int(view.layers[-1][0].shape[0])
                row["labels"] = e.get("labels")
            rows.append(row)
        return rows

    # ---- changes -------------------------------------------------------------------------
    def add(self, tasks: list[Task], replace: bool = False) -> None:
        clash = [t.name for t in tasks if t.name in self.index]
        if clash and not replace:
            raise ValueError(f"task(s) {', '.join(clash)} already in the bank; remove them first or pass replace=True")
        from promptmux.kinds import kind_of

        for t in tasks:
            if t.name in self.index:
                self.remove(t.name)
            shared = kind_of(t).shared_roles
            tensors = {}
            for role, value in t.tensors.items():
                value = np.ascontiguousarray(value, dtype=np.float32)
                if role in shared:
                    key = "shared/" + hashlib.sha256(value.tobytes() + str(value.shape).encode()).hexdigest()[:20]
                else:
                    key = f"task/{t.name}/{role}"
                self.arrays[key] = value
                tensors[role] = key
            head = {}
            for param, value in t.head.items():
                key = f"task/{t.name}/head/{param}"
                self.arrays[key] = np.ascontiguousarray(value, dtype=np.float32)
                head[param] = key
            self.index[t.name] = {
                "kind": t.kind,
                "peft_type": t.peft_type,
                "num_virtual_tokens": t.num_virtual_tokens,
                "tensors": tensors,
                "head": head,
                "labels": t.labels,
                "source": t.source,
            }
            self._views.pop(t.name, None)
            self.view(t.name)  # fail now, not at the first request, if the head is incomplete

    def remove(self, name: str) -> list[str]:
        """Remove a task, or every task of an MPT adapter (`NAME` removes `NAME/0` ... `NAME/K-1`)."""
        name = task_name(name)
        names = [name] if name in self.index else [n for n in self.index if n.startswith(name + "/")]
        if not names:
            raise self.unknown(name)
        for n in names:
            e = self.index.pop(n)
            self._views.pop(n, None)
            for key in list(e["tensors"].values()) + list(e["head"].values()):
                if key.startswith("task/"):
                    self.arrays.pop(key, None)
        live = {k for e in self.index.values() for k in e["tensors"].values()}
        for key in [k for k in self.arrays if k.startswith("shared/") and k not in live]:
            del self.arrays[key]
        return names

    # ---- storage -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the bank durably: a temp file, fsynced, renamed over the old one (readers see one or the
        other, also after a power loss). A deployment's bank is changed under deployment_lock (see
        export/deploy.py update_tasks)."""
        folder = Path(folder)
        target = folder / BANK_FILE
        fd, tmp = tempfile.mkstemp(prefix=".bank-", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(dict(self.arrays), tmp, metadata={INDEX_KEY: json.dumps(self.index)})
            durable_replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    @classmethod
    def load(cls, folder: str | Path, spec: ArchSpec) -> "PromptBank":
        path = Path(folder) / BANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a promptmux deployment (run promptmux export)")
        bank = cls(spec)
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if INDEX_KEY not in meta:
                raise ValueError(f"{path} has no task index; it was not written by promptmux")
            bank.index = json.loads(meta[INDEX_KEY])
            bank.arrays = {k: f.get_tensor(k) for k in f.keys()}
        return bank


