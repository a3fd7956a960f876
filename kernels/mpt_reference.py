"""Multitask Prompt Tuning prompt composition: the PyTorch reference.

For each batch row b with MPT task t_b (a row of the bank's factor tables):

    prompt[b] = shared[shared_ids[t_b]] * (cols[t_b] @ rows[t_b])      # [T, d]
    out[b]    = concat(prompt[b], embeds[b])                          # [T + S, d]

`shared` holds the deduplicated shared prompts of all MPT adapters [A, T, d]; `cols` [K, T, r]
and `rows` [K, r, d] hold every MPT task's rank-r factors; `shared_ids` [K] maps a task to its
shared prompt. Adapters with fewer virtual tokens or lower rank are zero-padded, which leaves
the product unchanged (padded virtual tokens are masked by the caller).

The function is registered as the torch custom op `promptmux::mpt_prompt_concat` so that the
ONNX exporter emits one `ai.mpt::MPTPromptConcat` node for it (see export/mpt_function.py)
instead of inlining the math; eager PyTorch runs this reference.
"""

from __future__ import annotations

import torch


def mpt_prompt_concat_reference(
    task_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    shared: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    embeds: torch.Tensor,
) -> torch.Tensor:
    prompt = shared[shared_ids[task_ids]] * torch.matmul(cols[task_ids], rows[task_ids])
    return torch.cat([prompt.to(embeds.dtype), embeds], dim=1)


@torch.library.custom_op("promptmux::mpt_prompt_concat", mutates_args=())
def mpt_prompt_concat(
    task_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    shared: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    embeds: torch.Tensor,
) -> torch.Tensor:
    return mpt_prompt_concat_reference(task_ids, shared_ids, shared, cols, rows, embeds)


@mpt_prompt_concat.register_fake
def _(task_ids, shared_ids, shared, cols, rows, embeds):
    return embeds.new_empty(embeds.shape[0], shared.shape[1] + embeds.shape[1], embeds.shape[2])
