"""SPoT-style retrieval: rank a deployment's tasks by how similar their prompts are to a query.

A query is a bank task, a PEFT adapter folder (e.g. a prompt briefly trained on a new task), a
Task or a [T, d] array. Only input-level prompts are ranked; `promptmux.library.prompts` says
which those are and how prompts of different lengths compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptmux.core.adapters import load_adapter, read_adapter_config
from promptmux.core.bank_errors import served
from promptmux.core.task import Task, task_name
from promptmux.library.prompts import (
    LibraryError,
    check_method,
    is_input_level,
    prompt_similarity,
    task_prompt,
)


def load_bank(deploy_dir_or_bank):
    """(bank, base config or None, deploy dir or None) for a deployment folder or a PromptBank."""
    from promptmux.core.bank import PromptBank

    if isinstance(deploy_dir_or_bank, PromptBank):
        return deploy_dir_or_bank, None, None
    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_config

    folder = Path(deploy_dir_or_bank)
    config = load_base_config(folder)
    return PromptBank.load(folder, arch_for(config)), config, folder


def _comparable(bank) -> tuple[list[str], list[str]]:
    """(tasks that can be ranked, tasks that cannot), each in bank order."""
    names, skipped = [], []
    for name in bank.names():
        (names if is_input_level(bank.entry(name)["kind"]) else skipped).append(name)
    return names, skipped


def _query_prompt(query, bank, config) -> tuple[np.ndarray, str | None]:
    """(prompt [T, d], the bank task it is or None) for a bank task name, adapter folder, Task or array."""
    if isinstance(query, np.ndarray):
        return query, None
    if isinstance(query, Task):
        return task_prompt(query), None
    q = str(query)
    if q in bank:  # the task as stored (NFC), so that it is left out of its own ranking however it was typed
        return task_prompt(bank.view(q)), task_name(q)
    path = Path(q)
    if path.is_dir():
        if config is None:
            raise LibraryError("an adapter folder query needs the deployment folder (its config.json), not a bank")
        cfg = read_adapter_config(path)
        tasks = load_adapter("query", path, config)
        if len(tasks) != 1:
            raise LibraryError(
                f"query adapter {q!r} is a Multitask Prompt Tuning adapter with {len(tasks)} tasks; add it to the "
                "bank (promptmux tasks DIR add NAME=ADAPTER) and query one of its tasks by name, NAME/k")
        if not is_input_level(tasks[0].kind):
            raise LibraryError(
                f"query adapter {q!r} is {cfg.get('peft_type')}: prefix prompts are per-layer attention keys/values "
                "and are not comparable with input-level prompts; promptmux ranks prompt-tuning, P-tuning and MPT "
                "prompts only")
        return task_prompt(tasks[0]), None
    raise LibraryError(f"query {q!r} is neither a task of this bank ({served(len(bank), bank.names)}) nor an "
                       "adapter folder")


def similar_tasks(deploy_dir_or_bank, query, top_k: int | None = 5, method: str = "avg-cosine") -> list[dict]:
    """Rank the bank's input-level tasks by similarity to `query`, most similar first.

    deploy_dir_or_bank: a deployment folder (or a loaded PromptBank).
    query: a task of the bank (left out of the ranking), a PEFT adapter folder (prompt tuning, P-tuning,
        one-task MPT; checked against the deployment's base model), a Task or a [T, d] array.
    top_k: how many to return (None: all). method: "avg-cosine" or "per-token-cosine".
    Returns [{"rank", "task", "score", "kind", "peft_type", "num_virtual_tokens"}, ...]. Prefix-tuning tasks
    are not ranked (see `skipped_tasks`).
    """
    check_method(method)
    if top_k is not None and top_k < 1:
        raise LibraryError(f"top_k must be at least 1, got {top_k}")
    bank, config, _ = load_bank(deploy_dir_or_bank)
    if top_k is not None:
        return top_tasks(bank, config, query, method, top_k)
    return rank_tasks(bank, config, query, method)


RESCORED = 64  # candidates beyond 4 * top_k whose similarity is computed exactly from their prompts


def top_tasks(bank, config, query, method: str, top_k: int) -> list[dict]:
    """The top_k rows of rank_tasks without reading every prompt: retrieval's index (core/vector_index.py: every
    task's float16 retrieval vector as one float32 matrix) ranks every task with one matrix-vector product, then the
    best 4 * top_k + 64 are scored exactly from their prompts. The same answer as rank_tasks unless more tasks than
    that lie within float16 rounding (about 1e-3) of the k-th score."""
    from promptmux.core.bank import UnknownTaskError, prompt_summaries

    q, q_task = _query_prompt(query, bank, config)
    index = bank.vector_index()
    ids, scores = index.scores(method, prompt_summaries(q)[0 if method == "avg-cosine" else 1])
    if not len(ids):
        return []
    if index.dim != q.shape[1]:
        raise LibraryError(f"query prompt has width {q.shape[1]} but the bank's prompts have {index.dim}")
    keep = min(len(ids), 4 * top_k + RESCORED + 1)  # + 1: the query itself may be among them
    best = np.argpartition(-scores, keep - 1)[:keep] if keep < len(ids) else np.arange(len(ids))
    rows = []
    for name in index.names(ids[best]).values():
        if name == q_task:
            continue
        try:
            view = bank.view(name)
        except UnknownTaskError:  # removed by another process since it was ranked
            continue
        p = task_prompt(view)
        rows.append({"task": name, "score": prompt_similarity(q, p, method), "kind": view.kind,
                     "peft_type": view.peft_type, "num_virtual_tokens": int(p.shape[0])})
    rows.sort(key=lambda r: (-r["score"], r["task"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows[:top_k])]


def rank_tasks(bank, config, query, method: str) -> list[dict]:
    """Every rankable task of a loaded bank against `query` (as `similar_tasks`, no top-k cut).

    config: the deployment's base config, needed only for an adapter-folder query.
    """
    q, q_task = _query_prompt(query, bank, config)
    names, _ = _comparable(bank)
    rows = []
    for name in names:
        if name == q_task:
            continue
        view = bank.view(name)
        p = task_prompt(view)
        if p.shape[1] != q.shape[1]:
            raise LibraryError(f"query prompt has width {q.shape[1]} but task {name!r} has {p.shape[1]}")
        rows.append({"task": name, "score": prompt_similarity(q, p, method), "kind": view.kind,
                     "peft_type": view.peft_type, "num_virtual_tokens": int(p.shape[0])})
    rows.sort(key=lambda r: (-r["score"], r["task"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def skipped_tasks(deploy_dir_or_bank) -> list[str]:
    """The bank's tasks that `similar_tasks` does not rank (prefix tuning: no input-level prompt, so no retrieval
    summary), in bank order: one query of the store (task by task it took 2.4 s at 60,000 tasks)."""
    bank, _, _ = load_bank(deploy_dir_or_bank)
    with bank.lock:
        return [r[0] for r in bank.db.execute(
            "SELECT name FROM tasks WHERE name NOT IN (SELECT name FROM vectors) ORDER BY seq")]
