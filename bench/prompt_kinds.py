"""The benchmark's prompt-kind workloads and PEFT-baseline rules, in one place:

- the synthetic banks of the scaling benchmark: plain prompts, MPT factors, MPT prompts composed ahead of time;
- the PEFT baseline: which adapter and MPT task id serve a task, and how many leading virtual positions PEFT's
  causal-LM logits carry (asked of the task's kind, promptmux.kinds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime

# The scaling benchmark's bank layouts (--scaling-kinds):
# prompt:       prompt tuning, P virtual tokens per task;
# mpt-factors:  MPT as the bank stores it: one shared prompt per adapter of MPT_TASKS_PER_ADAPTER tasks, each
#               task its rank-r factors, composed inside the graph;
# mpt-composed: the same MPT tasks with each prompt composed ahead of time and stored as a plain prompt.
SCALING_KINDS = ("prompt", "mpt-factors", "mpt-composed")
MPT_TASKS_PER_ADAPTER = 10


def check_scaling_kinds(kinds: list[str]) -> None:
    for kind in kinds:
        if kind not in SCALING_KINDS:
            raise ValueError(f"unknown scaling kind {kind!r}; choose from {', '.join(SCALING_KINDS)}")


def synthetic_tasks(kind: str, n: int, rt: Runtime, virtual_tokens: int = 20, rank: int = 1, seed: int = 0,
                    num_labels: int = 2) -> list:
    """n Task objects of one kind for the deployment's model (random values, trained-prompt scale)."""
    from promptmux.kinds.mpt import KIND as MPT
    from promptmux.kinds.prompt import KIND as PROMPT

    check_scaling_kinds([kind])
    rng = np.random.default_rng(seed)
    d, p = rt.dims.hidden_size, virtual_tokens
    scale = 0.05

    def head() -> dict:
        out = {}
        layers = rt.spec.head
        for j, layer in enumerate(layers):
            rows = num_labels if j == len(layers) - 1 else d
            out[f"{layer.module}.weight"] = (rng.standard_normal((rows, d)) * 0.05).astype(np.float32)
            out[f"{layer.module}.bias"] = np.zeros(rows, np.float32)
        return out

    labels = [f"label{i}" for i in range(num_labels)] if rt.spec.head else None
    tasks = []
    if kind == "prompt":
        for i in range(n):
            tasks.append(PROMPT.from_prompt(f"t{i:04d}", (rng.standard_normal((p, d)) * scale).astype(np.float32),
                                            head=head(), labels=labels, source="synthetic"))
        return tasks
    shared = None
    for i in range(n):
        g, k = divmod(i, MPT_TASKS_PER_ADAPTER)
        if k == 0:
            shared = (rng.standard_normal((p, d)) * scale).astype(np.float32)
        cols = (1.0 + 0.1 * rng.standard_normal((p, rank))).astype(np.float32)
        rows = (1.0 + 0.1 * rng.standard_normal((rank, d))).astype(np.float32) / rank
        name = f"m{g:03d}/{k}"
        if kind == "mpt-factors":
            tasks.append(MPT.from_factors(name, shared, cols, rows, head=head(), labels=labels, source="synthetic"))
        else:  # composed ahead of time: what the MPT task's prompt is, stored as a plain prompt
            tasks.append(PROMPT.from_prompt(name, shared * (cols @ rows), head=head(), labels=labels,
                                            source="synthetic"))
    return tasks


def peft_adapter_of(task: str) -> tuple[str, int | None]:
    """The PEFT adapter that serves a task, and its MPT task id: MPT tasks `NAME/k` run adapter NAME with
    task_ids = k; any other task is its own adapter."""
    adapter, _, k = task.partition("/")
    return adapter, int(k) if k else None


def peft_virtual_positions(view) -> int:
    """Leading virtual-token positions in PEFT's causal-LM logits for a task's bank view: P for prompt tuning and
    MPT (the prompt is prepended as input positions), 0 for key/value prefixes (prefix tuning, CARTRIDGE)."""
    from promptmux.kinds import kind_of

    return view.num_virtual_tokens if kind_of(view).in_sequence else 0
