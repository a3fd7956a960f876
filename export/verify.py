"""`promptmux verify`: the deployment against PEFT eager on the same inputs, task by task.

PEFT runs each adapter on its own (it serves one adapter per batch); the deployment runs one
mixed batch holding the rows of every task. Rows are compared one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from promptmux.core.adapters import read_adapter_config
from promptmux.core.archs import pad_id
from promptmux.core.folder import config_hash, load_base_config
from promptmux.core.quiet import quiet_libraries
from promptmux.kinds import BY_PEFT_TYPE

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def verification_batch(vocab_size: int, pad_id: int, rows: int, seq: int, padding_side: str, seed: int = 0):
    """Random token ids with varied padding (pads carry the pad id, as a tokenizer writes them)."""
    rng = np.random.default_rng(seed)
    low = 5 if vocab_size > 10 else 0
    ids = rng.integers(low, vocab_size, size=(rows, seq))
    mask = np.ones_like(ids)
    for i in range(rows):
        pad = i % max(1, min(4, seq - 1))
        if pad:
            if padding_side == "left":
                mask[i, :pad] = 0
            else:
                mask[i, -pad:] = 0
    return np.where(mask == 1, ids, pad_id), mask


def adapter_num_labels(adapter_dir) -> int | None:
    """Outputs of the classification head an adapter saved (modules_to_save), if any."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    with safe_open(str(path), "numpy") as f:
        keys = [k for k in f.keys() if k.endswith(".weight") and k not in ("prompt_embeddings",)]
        heads = [k for k in keys if any(h in k for h in ("classifier.weight", "out_proj.weight", "score.weight"))]
        return int(f.get_slice(heads[0]).get_shape()[0]) if heads else None


def peft_outputs(base_dir, adapter_dir, ids: np.ndarray, mask: np.ndarray, config,
                 mpt_task: int | None = None) -> list[np.ndarray]:
    """PEFT eager, per row, in the runtime's output format. config: the deployment's (it says which model class
    PEFT wraps). A causal LM's classifier runs each row alone, unpadded: PEFT pools the last position of
    prompt-tuning rows, a pad in a padded batch, and the deployment gives every row its result alone."""
    from peft import PeftModel

    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_model

    cfg = read_adapter_config(adapter_dir)
    spec = arch_for(config)
    model = PeftModel.from_pretrained(load_base_model(base_dir, config, num_labels=adapter_num_labels(adapter_dir)),
                                      str(adapter_dir)).eval()

    def run(ids, mask):
        kwargs = {"task_ids": torch.full((ids.shape[0],), mpt_task)} if mpt_task is not None else {}
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).logits
        return out.float().numpy()

    if spec.feature == "last":
        return [run(ids[i:i + 1, mask[i] == 1], mask[i:i + 1, mask[i] == 1])[0] for i in range(ids.shape[0])]
    logits = run(ids, mask)
    if spec.family.classifies:
        return list(logits)
    skip = cfg["num_virtual_tokens"] if BY_PEFT_TYPE[cfg["peft_type"]].in_sequence else 0
    return [logits[i, skip:][mask[i].astype(bool)] for i in range(ids.shape[0])]


def peft_generate(base_dir, adapter_dir, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                  mpt_task: int | None = None) -> list[list[int]]:
    """PEFT's greedy generate (seq2seq), the new tokens per row."""
    from peft import PeftModel

    from promptmux.core.folder import load_base_model

    model = PeftModel.from_pretrained(load_base_model(base_dir), str(adapter_dir)).eval()
    kwargs = {"task_ids": torch.full((ids.shape[0],), mpt_task)} if mpt_task is not None else {}
    with torch.inference_mode():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, **kwargs)
    return out[:, 1:].tolist()  # drop the decoder start token


def _verify_generation(rt: Runtime, base_dir, adapters, plan, ids, mask, tasks, quiet, new_tokens: int = 8,
                       details=None):
    """Seq2seq: greedy tokens of one mixed batch against PEFT's generate, per task the fraction of rows that
    differ (0.0: every row token-identical). PEFT's seq2seq forward and generate place MPT prompts differently,
    and the deployment follows generate, so tokens are what is compared."""
    from tqdm.auto import tqdm

    got = rt.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=new_tokens,
                      eos_token_id=[])
    worst: dict[str, float] = {}
    for task, adapter, mpt_task in tqdm(plan, desc="verify", unit="task", disable=quiet, leave=False):
        rows = [i for i, t in enumerate(tasks) if t == task]
        want = peft_generate(base_dir, adapters[adapter], ids[rows], mask[rows], new_tokens, mpt_task)
        differ = [float(got[r]["token_ids"] != w) for r, w in zip(rows, want)]
        worst[task] = sum(differ) / len(rows)
        if details is not None:
            details[task] = {"max_abs_diff": worst[task], "scale": 1.0, "rows": differ, "tokens": True}
    return worst


def verify(deploy_dir, base_dir, adapters: dict[str, str | Path], backend: str = "onnxruntime",
           rows_per_task: int = 3, seq: int = 12, quiet: bool = False, details: dict | None = None
           ) -> dict[str, float]:
    """Max abs difference per task between the deployment (one mixed batch) and PEFT eager
    (seq2seq: the fraction of rows whose greedy tokens differ from PEFT's generate). details, if given, gets per
    task {"max_abs_diff", "scale" (PEFT's largest output), "rows" (the rows' differences)}."""
    from tqdm.auto import tqdm

    from promptmux.core.archs import arch_for
    from promptmux.runtime.runtime import Runtime

    quiet_libraries()  # PEFT loads a model per adapter: no loading bars or deprecation warnings in the output
    rt = Runtime(deploy_dir, backend=backend, base=base_dir)
    base_config = load_base_config(base_dir)  # refuses a folder that is no base model, saying so
    config = rt.hf_config  # the deployment's: a causal LM's checkpoint may be deployed as a classifier
    recorded = rt.manifest["base"].get("config_sha256")
    if base_config.model_type != config.model_type or (recorded and recorded != config_hash(base_config)):
        raise ValueError(f"--base {str(base_dir)!r} is not the model this deployment was exported from (a "
                         f"{base_config.model_type} model whose config differs); verify compares with PEFT on that "
                         "base model: pass it")
    family = arch_for(config).family
    # Which tasks each adapter provides, as named in the deployment.
    plan: list[tuple[str, str, int | None]] = []  # (task, adapter name, mpt task id)
    for name, path in adapters.items():
        cfg = read_adapter_config(path)
        plan += [(task, name, peft_task) for task, peft_task in BY_PEFT_TYPE[cfg["peft_type"]].task_names(name, cfg)]
    missing = [t for t, _, _ in plan if t not in rt.tasks]
    if missing:
        raise ValueError(f"the deployment has no task(s) {', '.join(missing)}; "
                         f"it serves {', '.join(rt.tasks)}")
    for task, adapter, _ in plan:  # another kind of adapter cannot match: say so rather than FAIL on numbers
        served, given = rt.bank.view(task).peft_type, read_adapter_config(adapters[adapter])["peft_type"]
        if served != given:
            raise ValueError(f"task {task!r} of the deployment is {served} but adapter {str(adapters[adapter])!r} is "
                             f"{given}: the kinds differ; pass the adapter the task was exported from")
    pad = pad_id(config)
    ids, mask = verification_batch(config.vocab_size, pad, rows_per_task * len(plan), seq,
                                   family.prompt_padding)
    tasks = [plan[i % len(plan)][0] for i in range(ids.shape[0])]
    if not family.forward_rows:  # a seq2seq model: verified on the tokens it generates
        return _verify_generation(rt, base_dir, adapters, plan, ids, mask, tasks, quiet, details=details)
    got = rt.forward(ids, mask, tasks)
    worst: dict[str, float] = {}
    for task, adapter, mpt_task in tqdm(plan, desc="verify", unit="task", disable=quiet, leave=False):
        rows = [i for i, t in enumerate(tasks) if t == task]
        want = peft_outputs(base_dir, adapters[adapter], ids[rows], mask[rows], config, mpt_task)
        diffs = [float(np.abs(got[r] - w).max()) for r, w in zip(rows, want)]
        worst[task] = max(diffs)
        if details is not None:
            details[task] = {"max_abs_diff": worst[task], "scale": max(float(np.abs(w).max()) for w in want),
                             "rows": diffs}
    return worst
