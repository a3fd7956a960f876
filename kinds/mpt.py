"""Multitask prompt tuning (PEFT MULTITASK_PROMPT_TUNING): one adapter holds K tasks that share a prompt [T, d];
task k's prompt is shared ⊙ (cols[k] @ rows[k]) with rank-r factors cols [T, r], rows [r, d]. The bank stores the
shared prompt once and the factors per task; the graph composes the prompt (ai.mpt::MPTPromptConcat), so a batch
ships factors, not composed prompts."""

from __future__ import annotations

import numpy as np

from promptmux.core.adapter_checks import config_int, expect_shape
from promptmux.core.task import Task

from .base import PromptKind, ReadContext


class MultitaskPrompt(PromptKind):
    name = "mpt"
    peft_types = ("MULTITASK_PROMPT_TUNING",)
    tensor_keys = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
    shared_roles = frozenset({"shared"})

    def read(self, ctx: ReadContext):
        emb, cols, rows = (ctx.tensor(k) for k in self.tensor_keys)
        if cols.ndim != 3:
            raise ctx.fail(f"prefix_task_cols has shape {tuple(cols.shape)}, not [tasks, tokens, ranks]")
        k = config_int(ctx.cfg, "num_tasks", ctx.adapter_dir) or cols.shape[0]
        r = config_int(ctx.cfg, "num_ranks", ctx.adapter_dir) or cols.shape[2]
        saved = ctx.n * ctx.subs  # seq2seq: the encoder half is what generate uses (see kinds/base.py)
        expect_shape("MPT shared prompt", emb, (saved, ctx.dims.prompt_width), ctx.adapter_dir)
        expect_shape("MPT prefix_task_cols", cols, (k, saved, r), ctx.adapter_dir)
        expect_shape("MPT prefix_task_rows", rows, (k, r, ctx.dims.prompt_width), ctx.adapter_dir)
        shared = np.ascontiguousarray(emb[: ctx.n])
        return [self.task(ctx, {"shared": shared, "cols": cols[t, : ctx.n], "rows": rows[t]}, name=f"{ctx.name}/{t}")
                for t in range(k)]

    def from_factors(self, name: str, shared: np.ndarray, cols: np.ndarray, rows: np.ndarray, **meta) -> Task:
        """An MPT task of its shared prompt [T, d] and rank-r factors cols [T, r], rows [r, d], made rather than
        read from an adapter; tasks given the same `shared` array share it in the bank."""
        tensors = {"shared": shared, "cols": cols, "rows": rows}
        return Task(name, self.name, self.peft_types[0], shared.shape[0], tensors, **meta)

    def task_names(self, name, cfg):
        return [(f"{name}/{t}", t) for t in range(int(cfg["num_tasks"]))]

    def slots(self, task, has_prefix):
        return "mpt", task.tensors["shared"].shape[0]

    def prepare(self, tasks, layout):
        """The batch's distinct MPT tasks as a small local factor table; shared prompts once per distinct array."""
        index: dict[str, int] = {}
        shared_index: dict[int, int] = {}
        shared, cols, rows, shared_ids = [], [], [], []
        for t in tasks:
            if t.name in index:
                continue
            index[t.name] = len(cols)
            key = id(t.tensors["shared"])
            if key not in shared_index:
                shared_index[key] = len(shared)
                shared.append(t.tensors["shared"])
            shared_ids.append(shared_index[key])
            cols.append(t.tensors["cols"])
            rows.append(t.tensors["rows"])
        d, slots = layout.dims.prompt_width, layout.mpt_slots
        rank = max(c.shape[1] for c in cols)
        f = layout.feeds
        f["mpt_shared"] = np.zeros((len(shared), slots, d), layout.dtype)
        f["mpt_cols"] = np.zeros((len(cols), slots, rank), layout.dtype)
        f["mpt_rows"] = np.zeros((len(rows), rank, d), layout.dtype)
        for i, s in enumerate(shared):
            f["mpt_shared"][i, : s.shape[0]] = s
        for i, (c, r) in enumerate(zip(cols, rows)):
            f["mpt_cols"][i, : c.shape[0], : c.shape[1]] = c
            f["mpt_rows"][i, : r.shape[0]] = r
        f["mpt_shared_ids"] = np.asarray(shared_ids, np.int64)
        layout.mpt_index = index

    def place(self, i, task, layout):
        layout.feeds["mpt_task_ids"][i] = layout.mpt_index[task.name]
        layout.virtual_in_front(i, 0, task.tensors["shared"].shape[0])

    def input_prompt(self, task):
        # PEFT's own composition (MultitaskPromptEmbedding.forward), float32, batched [1, T, r] @ [1, r, d] as PEFT
        # runs it: a plain 2-D matmul can round differently.
        import torch

        shared, cols, rows = (torch.from_numpy(np.ascontiguousarray(task.tensors[k], dtype=np.float32))
                              for k in ("shared", "cols", "rows"))
        return (shared * torch.matmul(cols[None], rows[None])[0]).numpy()

    def factors(self, task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shared [T, d], cols [T, r], rows [r, d]): what an MPT target adapter is initialised from."""
        return task.tensors["shared"], task.tensors["cols"], task.tensors["rows"]


KIND = MultitaskPrompt()
