"""Write new PEFT adapter folders initialised from a deployment's prompts: the opposite of export.

`init_adapter` writes the files PEFT's `save_pretrained` writes, so `PeftModel.from_pretrained(base,
folder)` loads the result and PEFT trains it as any saved prompt adapter (`trainable_peft_model` spells
out the PEFT calls). Initialisations (`promptmux.library.prompts` has the arithmetic):

* SPoT (Vu et al., 2022): from one source task's prompt, from each of the top k tasks most similar to a
  query ("best of top-k"), or from their similarity-weighted average.
* Multitask Prompt Tuning (Wang et al., 2023): the source's shared prompt with the source tasks' rank-r
  factors averaged (PEFT's `AVERAGE_SOURCE_TASKS`), or one task's factors (`EXACT_SOURCE_TASK`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmux.core.bank_errors import served
from promptmux.core.durable import as_created_tree
from promptmux.core.folder import check_out_folder
from promptmux.core.task import Task
from promptmux.kinds import get as get_kind
from promptmux.kinds import kind_of
from promptmux.library.prompts import (
    LibraryError,
    check_method,
    combine_prompts,
    resample_tokens,
    score_weights,
    task_prompt,
    weighted_mean,
)
from promptmux.library.retrieval import load_bank, rank_tasks, top_tasks

INIT_KINDS = ("prompt-tuning", "mpt-target")
PROVENANCE_FILE = "promptmux_init.json"


@dataclass
class _Source:
    task: str
    score: float | None
    weight: float


def _check_request(kind, from_task, top_k, weighted, query, num_virtual_tokens, num_labels=None) -> None:
    if kind not in INIT_KINDS:
        raise LibraryError(f"unknown --kind {kind!r}; use one of {', '.join(INIT_KINDS)}")
    if (from_task is None) == (top_k is None):
        raise LibraryError("give exactly one source: from_task (--from TASK) or top_k (--top-k K with --query)")
    if top_k is not None and top_k < 1:
        raise LibraryError(f"top_k must be at least 1, got {top_k}")
    if top_k is not None and query is None:
        raise LibraryError("--top-k ranks the bank against a query: pass --query TASK_OR_ADAPTER_DIR (SPoT uses a "
                           "prompt briefly trained on the target task)")
    if from_task is not None and (weighted or query is not None):
        raise LibraryError("--weighted and --query go with --top-k, not with --from")
    if num_virtual_tokens is not None and num_virtual_tokens < 1:
        raise LibraryError(f"number of virtual tokens must be at least 1, got {num_virtual_tokens}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise LibraryError(f"--num-labels must be a whole number of at least 1, got {num_labels!r}")


def _written_here(folder: Path) -> bool:
    """Whether init-adapter wrote `folder` (its record in it, or in each of its subfolders: best of top-k), which
    --overwrite may replace; anything else (the user's adapters, a deployment) it may not."""
    if (folder / PROVENANCE_FILE).is_file():
        return True
    entries = list(folder.iterdir())
    return bool(entries) and all(e.is_dir() and (e / PROVENANCE_FILE).is_file() for e in entries)


def _check_base(config, deploy_dir: Path | None, base_dir: Path) -> object:
    """The base model's config, refused unless it is the model the deployment was exported from."""
    from promptmux.core.folder import MANIFEST, config_hash, load_base_config

    base_config = load_base_config(base_dir)
    if config is None:
        return base_config
    if base_config.model_type != config.model_type:
        raise LibraryError(f"--base {str(base_dir)!r} is a {base_config.model_type} model but the deployment's base is "
                           f"{config.model_type}")
    manifest = (deploy_dir / MANIFEST) if deploy_dir else None
    if manifest is not None and manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("base", {}).get("config_sha256")
        if recorded and recorded != config_hash(base_config):
            raise LibraryError(f"--base {str(base_dir)!r} is not the model this deployment was exported from (its config "
                               "differs); the prompts only mean something with that base model")
    base_config.architectures = config.architectures  # the deployment's model class (a causal LM's classifier)
    return base_config


def _usable_sources(kind: str, ranked: list[dict]) -> list[dict]:
    """The ranked tasks an adapter of `kind` can start from; refused when none is left."""
    if kind == "mpt-target":
        ranked = [r for r in ranked if get_kind(r["kind"]).factors is not None]
    if not ranked:
        what = "Multitask Prompt Tuning tasks" if kind == "mpt-target" else "prompt-tuning, P-tuning or MPT tasks"
        raise LibraryError(f"the bank holds no {what} to initialise from")
    return ranked


def _named_sources(kind: str, bank, from_task: str) -> list[str]:
    """--from TASK's tasks: TASK itself, or for an mpt-target all tasks NAME/k of an MPT adapter NAME."""
    if from_task in bank:
        return [from_task]
    group = [n for n in bank.adapter_names(from_task) if n != from_task] if kind == "mpt-target" else []
    if group:
        return group
    raise LibraryError(f"--from {from_task!r} names no task of this bank ({served(len(bank), bank.names)})")


def _plans(kind, bank, ranking_config, from_task, top_k, weighted, query, method) -> list[list[_Source]]:
    """The sources of each adapter to write: one plan per adapter (best of top-k: one per source)."""
    if top_k is None:
        names = _named_sources(kind, bank, from_task)
        return [[_Source(n, None, 1.0 / len(names)) for n in names]]
    check_method(method)
    # mpt-target keeps only MPT sources, so it ranks every task; the other kinds take the store's top-k directly.
    ranked = (rank_tasks(bank, ranking_config, query, method) if kind == "mpt-target"
              else top_tasks(bank, ranking_config, query, method, top_k))
    ranked = _usable_sources(kind, ranked)[:top_k]
    scores = {r["task"]: r["score"] for r in ranked}
    names = [r["task"] for r in ranked]
    if weighted:
        return [[_Source(n, scores[n], w) for n, w in zip(names, score_weights([scores[n] for n in names]))]]
    return [[_Source(n, scores[n], 1.0)] for n in names]


def _initial_tensors(kind: str, bank, plan: list[_Source], weighted: bool, num_virtual_tokens: int | None,
                     record: dict) -> dict[str, np.ndarray]:
    """The new adapter's prompt tensors, in the bank's layout; notes what was resampled or dropped in `record`."""
    if kind == "prompt-tuning":
        prompts = [task_prompt(bank.view(s.task)) for s in plan]
        length = num_virtual_tokens or prompts[0].shape[0]
        if len(plan) == 1 and plan[0].weight == 1.0:
            init = resample_tokens(prompts[0], length).astype(np.float32)
        else:
            init = combine_prompts(prompts, [s.weight for s in plan], length)
        record["resampled"] = [s.task for s, p in zip(plan, prompts) if p.shape[0] != length]
        return {"prompt": init}
    # mpt-target: factors average only over sources sharing the best source's shared prompt (equal arrays: how the
    # bank stores a shared prompt is its own matter) and rank
    parts = []
    for s in plan:
        view = bank.view(s.task)
        factors = kind_of(view).factors
        if factors is None:
            raise LibraryError(f"--kind mpt-target needs Multitask Prompt Tuning source tasks; {s.task!r} is "
                               f"{view.peft_type}")
        parts.append(factors(view))
    shared, cols0, _ = parts[0]
    keep = [i for i, p in enumerate(parts) if p[1].shape == cols0.shape and np.array_equal(p[0], shared)]
    if len(keep) < len(plan):
        record["dropped"] = {"tasks": [plan[i].task for i in range(len(plan)) if i not in keep],
                             "why": "another shared prompt or rank than the best source"}
        plan[:], parts = [plan[i] for i in keep], [parts[i] for i in keep]
        ws = score_weights([s.score for s in plan]) if weighted else [1.0 / len(plan)] * len(plan)
        for s, w in zip(plan, ws):
            s.weight = w
        record["sources"] = [{"task": s.task, "score": s.score, "weight": s.weight} for s in plan]
    if num_virtual_tokens is not None and num_virtual_tokens != shared.shape[0]:
        raise LibraryError(f"an mpt-target keeps the source's {shared.shape[0]} virtual tokens (its factors "
                           f"are per token); --num-virtual-tokens {num_virtual_tokens} does not fit")
    cols = weighted_mean([p[1] for p in parts], [s.weight for s in plan])
    rows = weighted_mean([p[2] for p in parts], [s.weight for s in plan])
    record["num_ranks"] = int(cols.shape[1])
    return {"shared": np.asarray(shared, dtype=np.float32), "cols": cols, "rows": rows}


def _task_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def init_adapter(deploy_dir, base_dir, out_dir, from_task: str | None = None, top_k: int | None = None,
                 weighted: bool = False, kind: str = "prompt-tuning", query=None, method: str = "avg-cosine",
                 num_virtual_tokens: int | None = None, num_labels: int | None = None, seed: int = 0,
                 overwrite: bool = False) -> list[dict]:
    """Write PEFT adapter folder(s) whose prompt is initialised from the bank; PEFT loads and trains them as usual.

    Sources (exactly one of):
      from_task: one bank task (prompt-tuning: its prompt; MPT tasks give their composed prompt). For
          kind="mpt-target", an MPT task NAME/k (its factors, PEFT's EXACT_SOURCE_TASK) or an MPT adapter
          name NAME (all of NAME/0..K-1 averaged, PEFT's AVERAGE_SOURCE_TASKS).
      top_k (+ query, + method): the k tasks most similar to `query` (see `similar_tasks`).
          weighted=False: SPoT's "best of top-k" -- one adapter per source in out_dir/<rank>-<task>
          (top_k=1: the adapter is out_dir itself); train each and keep the best.
          weighted=True: one adapter, the score-weighted average of the k sources (module doc).
    kind: "prompt-tuning" writes a PROMPT_TUNING adapter with num_virtual_tokens tokens (default: the best
        source's length; other lengths resample). "mpt-target" writes a MULTITASK_PROMPT_TUNING adapter with
        num_tasks=1: the source's shared prompt and the source tasks' cols and rows averaged (weighted: with
        the weights above; the sources must share that shared prompt and rank).
    num_labels: classification models: outputs of the (freshly initialised, trainable) head; default the
        base config's. seed: seeds that head's initialisation.
    Returns one dict per adapter written: {"path", "kind", "num_virtual_tokens", "sources": [{"task", "score",
    "weight"}], ...}; the same record is written into each folder as promptmux_init.json.
    """
    _check_request(kind, from_task, top_k, weighted, query, num_virtual_tokens, num_labels)
    query_dir = query if isinstance(query, (str, Path)) and Path(query).is_dir() else None
    out_dir = check_out_folder(Path(out_dir), overwrite, {"the deployment": deploy_dir, "the base model": base_dir,
                                                          "the --query adapter": query_dir},
                               what="an adapter folder (or folders)", replaceable=_written_here)

    bank, config, deploy_path = load_bank(deploy_dir)
    base_config = _check_base(config, deploy_path, Path(base_dir))
    plans = _plans(kind, bank, config or base_config, from_task, top_k, weighted, query, method)

    # Every adapter is written into one temporary folder first, so a failure leaves out_dir as it was.
    multi = len(plans) > 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    written: list[dict] = []
    try:
        results = []
        for rank, plan in enumerate(plans, start=1):
            record = {"kind": kind, "method": method if top_k is not None else None,
                      "strategy": ("from-task" if top_k is None else "top-k-weighted" if weighted else "best-of-top-k"),
                      "query": None if query is None or isinstance(query, (np.ndarray, Task)) else str(query),
                      "sources": [{"task": s.task, "score": s.score, "weight": s.weight} for s in plan]}
            tensors = _initial_tensors(kind, bank, plan, weighted, num_virtual_tokens, record)
            record["num_virtual_tokens"] = int(next(iter(tensors.values())).shape[0])
            folder = tmp_root / (f"{rank}-{_task_slug(plan[0].task)}" if multi else "adapter")
            _write_adapter(base_dir, base_config, folder, kind, tensors, num_labels, seed, record)
            results.append((folder.name if multi else None, record))
        as_created_tree(tmp_root)  # mkdtemp's 0700 and safetensors' 0600, for the folder users will read
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        if multi:
            os.replace(tmp_root, out_dir)
            for rel, record in results:
                record["path"] = str(out_dir / rel)
                written.append(record)
        else:
            os.replace(tmp_root / "adapter", out_dir)
            results[0][1]["path"] = str(out_dir)
            written.append(results[0][1])
    finally:
        if tmp_root.exists():
            shutil.rmtree(tmp_root, ignore_errors=True)
    for record in written:  # the record's path is final only now
        Path(record["path"], PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
    return written


def _load_base(base_dir, family, num_labels: int | None):
    """The base model as PEFT trains it (fp32); a classifier head of another size is freshly initialised."""
    import torch

    cls = family.auto_class()
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
    return cls.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)


def _peft_prompt_model(kind: str, base_model, common: dict, tensors: dict[str, np.ndarray]):
    """get_peft_model with the PEFT config of `kind`, its prompt parameters set to `tensors`."""
    import torch
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

    if kind == "prompt-tuning":
        peft_config = PromptTuningConfig(prompt_tuning_init="RANDOM", **common)
    else:
        peft_config = MultitaskPromptTuningConfig(prompt_tuning_init="RANDOM", num_tasks=1,
                                                  num_ranks=int(tensors["cols"].shape[1]), **common)
    model = get_peft_model(base_model, peft_config)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        if kind == "prompt-tuning":
            encoder.embedding.weight.copy_(torch.from_numpy(tensors["prompt"]))
        else:
            encoder.embedding.weight.copy_(torch.from_numpy(tensors["shared"]))
            encoder.prefix_task_cols.copy_(torch.from_numpy(tensors["cols"])[None])
            encoder.prefix_task_rows.copy_(torch.from_numpy(tensors["rows"])[None])
    return model


def _write_adapter(base_dir, base_config, folder: Path, kind: str, tensors: dict[str, np.ndarray],
                   num_labels: int | None, seed: int, record: dict) -> None:
    """get_peft_model on the base, set the prompt parameters, save_pretrained: the files PEFT itself writes."""
    import torch

    from promptmux.core.archs import arch_for, dims_of

    spec, dims = arch_for(base_config), dims_of(base_config)
    length = int(next(iter(tensors.values())).shape[0])
    common = dict(task_type=spec.family.task_type, num_virtual_tokens=length, token_dim=dims.prompt_width,
                  num_layers=dims.num_layers, num_attention_heads=dims.num_heads, num_transformer_submodules=1)
    torch.manual_seed(seed)  # seeds the freshly initialised classifier head
    labels = num_labels if spec.family.classifies else None
    model = _peft_prompt_model(kind, _load_base(base_dir, spec.family, labels), common, tensors)
    model.save_pretrained(str(folder))
    if spec.family.classifies:
        record["num_labels"] = int(model.base_model.config.num_labels)
    record["peft_type"] = model.peft_config["default"].peft_type.value


def trainable_peft_model(base_model, adapter_dir):
    """Plain PEFT, for training an adapter folder further (here: one `init_adapter` wrote).

    PEFT's `PeftModel.from_pretrained(..., is_trainable=True)` refuses prompt-learning adapters, so resuming
    training is: the saved config with inference_mode off, `get_peft_model`, then the saved weights (prompt,
    MPT factors, head) loaded into it. Equivalent to these lines of user code.
    """
    from peft import (
        PeftConfig,
        get_peft_model,
        load_peft_weights,
        set_peft_model_state_dict,
    )

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    model = get_peft_model(base_model, config)
    set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device="cpu"))
    return model
