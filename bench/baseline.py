"""The systems `promptmux bench` measures: a promptmux Runtime, and the PEFT eager baselines.

PEFT gets its best fair setup: the base model loaded once per distinct (classification-head size, PEFT method)
(PEFT keeps a head per adapter through modules_to_save, a head of another size needs another base, and PEFT
refuses to combine adapters of different peft types in one model), every adapter of a group loaded into that
model with `load_adapter` and switched with `set_adapter`; one adapter per batch, batches
grouped by task (the harness forms them), `torch.inference_mode`, the same thread count as promptmux. MPT
tasks `NAME/k` run adapter NAME with `task_ids = k`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .prompt_kinds import peft_adapter_of, peft_virtual_positions

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def generate_pad_id(config) -> int:
    """The pad_token_id PEFT's generate() is given (it fills a finished row with it): the model's pad token, else
    its end-of-sequence token, as transformers does. Graph inputs use core/archs.pad_id instead."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    return config.eos_token_id if isinstance(config.eos_token_id, int) else 0


class PromptmuxSystem:
    """One promptmux Runtime (any backend): batches are formed in arrival order, tasks mixed within a batch."""

    grouped = False
    pid = None  # in this process

    def __init__(self, rt: Runtime, label: str | None = None):
        self.rt = rt
        self.precision = rt.precision
        self.forward_precision = rt.forward_precision  # a language model's int8 is its generation's
        self.fast = rt.fast  # precision "fast": what was chosen on this CPU and why (runtime/fast.py)
        # the label rows are reported under: the backend, the precision where it is not exact, "fast:" if chosen
        self.backend = ("fast:" if rt.fast else "") + (
            rt.backend if rt.precision == "fp32" else f"{rt.backend}/{rt.precision}")
        self.name = label or f"promptmux/{self.backend}"

    def graph_runs(self) -> dict:
        return dict(self.rt.graph_runs)

    def settle(self) -> None:
        from promptmux.runtime.openvino_session import wait_for_specialisation

        wait_for_specialisation()

    def prepare(self, new_tokens: int) -> None:
        if new_tokens:
            self.rt.generator  # noqa: B018 - the decoder session and every task's prompt KV, before timing

    def run(self, ids: np.ndarray, mask: np.ndarray, tasks: list[str], new_tokens: int):
        if new_tokens:
            out = self.rt.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=new_tokens,
                                   eos_token_id=[])
            return [r["token_ids"] for r in out]
        return self.rt.forward(ids, mask, tasks)


# The baselines by name: what PEFT runs at (precision) and how its rows are labelled (backend).
PEFT_BASELINES = {"peft": ("fp32", "peft-eager"), "peft-bf16": ("bf16", "peft-bf16"),
                  "peft-int8": ("int8", "peft-int8")}


def quantize_linear_int8(torch, model, per_channel: bool = True) -> int:
    """PyTorch's own CPU int8 for a model, in place: every torch.nn.Linear becomes a dynamic int8 Linear (int8
    weights with a scale per output channel, activations quantized per batch), the kernels PyTorch picks for the
    CPU (fbgemm/oneDNN: VNNI where there is one). Per channel by default, the better of PyTorch's two for a user:
    on the demo (AMD Zen 4) it kept 93.4 % of PEFT fp32's held-out sentiment answers against 88.5 % per tensor,
    quantize_dynamic's own default, and 93.1 % against 89.3 % capped to AVX2 (python -m studies.peft_int8). Every
    Linear: the base model's, the head's, and PEFT's own (P-tuning's prompt encoder, prefix tuning's projection), as
    quantize_dynamic on a PeftModel does. Returns how many Linear layers it replaced."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # PyTorch has announced the removal of its eager-mode quantization
        raise ValueError(f"the peft-int8 baseline needs torch.ao.quantization.quantize_dynamic, which PyTorch "
                           f"{torch.__version__} lacks ({e}); drop peft-int8 from --baseline") from None
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    others = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"})
    if others or not linear:  # quantize_dynamic would leave those fp32: an int8 baseline in name only
        where = f"{', '.join(others)} layers (GPT-2's family)" if others else "no torch.nn.Linear layer"
        raise ValueError(f"the peft-int8 baseline quantizes torch.nn.Linear layers, and this model keeps its "
                         f"weights in {where}, which PyTorch's dynamic int8 leaves fp32: drop peft-int8 from "
                         "--baseline")
    import warnings

    with warnings.catch_warnings():  # its deprecation notices, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        spec = {torch.nn.Linear: per_channel_dynamic_qconfig} if per_channel else {torch.nn.Linear}
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return linear


class PeftSystem:
    """PEFT eager (PyTorch): one adapter per batch; the harness groups requests by task before batching.

    precision "bf16" is what a user gets by wrapping PEFT in `torch.autocast(device, dtype=torch.bfloat16)` (weights
    stay fp32; matrix products run in bf16, on AMX where the CPU has it); "int8" what they get from PyTorch's own
    dynamic int8 (`quantize_linear_int8`, CPU only)."""

    grouped = True
    pid = None

    def __init__(self, rt: Runtime, tasks: list[str], base: str | Path | None = None,
                 adapters: dict[str, str | Path] | None = None, device: str = "cpu", precision: str = "fp32"):
        import torch
        from peft import PeftModel

        from promptmux.core.adapters import read_adapter_config
        from promptmux.core.folder import load_base_model
        from promptmux.export.verify import adapter_num_labels

        self.torch = torch
        self.family = rt.spec.family
        self.device = device
        self.precision = precision
        self.name = self.backend = next((label for p, label in PEFT_BASELINES.values() if p == precision), None)
        if self.name is None:
            raise ValueError(f"PEFT baselines run at {', '.join(p for p, _ in PEFT_BASELINES.values())}, not "
                             f"{precision!r}")
        if precision == "int8" and device != "cpu":
            raise ValueError("the peft-int8 baseline is PyTorch's CPU int8; drop it from --baseline when the "
                             "systems run on a GPU")
        base_dir = Path(base or rt.manifest["base"]["path"])
        if not (base_dir / "config.json").is_file():
            raise FileNotFoundError(f"the PEFT baseline needs the base model; {base_dir} (recorded at export) is "
                                    "missing. Pass --base DIR")
        adapters = {k: Path(v) for k, v in (adapters or {}).items()}
        self.plan: dict[str, tuple[str, int | None]] = {}  # task -> (adapter name, MPT task id)
        dirs: dict[str, Path] = {}
        self.skip: dict[str, int] = {}  # causal LM logits: leading virtual positions PEFT returns
        for task in tasks:
            view = rt.bank.view(task)
            adapter, task_id = peft_adapter_of(task)
            folder = adapters.get(adapter) or adapters.get(task) or (Path(view.source) if view.source else None)
            if folder is None or not (folder / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"the PEFT baseline needs the adapter folder of task {task!r}; its recorded source "
                    f"{view.source or '(none)'} is missing. Pass --adapter {adapter}=DIR")
            dirs[adapter] = folder
            self.plan[task] = (adapter, task_id)
            self.skip[task] = peft_virtual_positions(view)
        # One base per (head size, PEFT method): PEFT refuses to combine adapters of different peft types, and a
        # head of another size needs another base. Every adapter of a group is loaded into that one model.
        groups: dict[tuple, list[str]] = {}
        for adapter, folder in dirs.items():
            labels = adapter_num_labels(folder) if self.family.classifies else None
            groups.setdefault((labels, read_adapter_config(folder).get("peft_type")), []).append(adapter)
        self.bases = len(groups)
        self.models: dict[str, object] = {}
        self.quantized_layers = 0  # int8: Linear layers made int8, over every base
        # PEFT names adapters internally; a task name inside PEFT's parameter prefix (e.g. "pt" in
        # "prompt_tuning_") can clobber weights on load, so the adapters get neutral names.
        self.peft_names = {adapter: f"adapter{i}" for i, adapter in enumerate(dirs)}
        for (labels, _), names in groups.items():
            model = PeftModel.from_pretrained(load_base_model(base_dir, num_labels=labels), str(dirs[names[0]]),
                                              adapter_name=self.peft_names[names[0]])
            for name in names[1:]:
                model.load_adapter(str(dirs[name]), adapter_name=self.peft_names[name])
            model = model.to(device).eval()
            if precision == "int8":
                self.quantized_layers += quantize_linear_int8(torch, model)
            if not self.family.classifies:  # EOS off, as promptmux's eos_token_id=[]: every row generates n tokens
                model.generation_config.eos_token_id = None
                model.base_model.generation_config.eos_token_id = None
            for name in names:
                self.models[name] = model
        cfg = rt.config
        self.pad_id = generate_pad_id(cfg)

    def prepare(self, new_tokens: int) -> None:
        pass

    def model_for(self, task: str):
        """The PEFT model holding the task's adapter, made active, and the keyword arguments its forward needs."""
        adapter, k = self.plan[task]
        model = self.models[adapter]
        if model.active_adapter != self.peft_names[adapter]:
            model.set_adapter(self.peft_names[adapter])
        kwargs = {"task_ids": self.torch.full((1,), k, device=self.device)} if k is not None else {}
        return model, kwargs

    def run(self, ids: np.ndarray, mask: np.ndarray, tasks: list[str], new_tokens: int):
        """One batch of a single task (rows in the harness's grouped order)."""
        torch = self.torch
        task = tasks[0]
        if any(t != task for t in tasks):
            raise ValueError("PEFT serves one adapter per batch; group the rows by task")
        model, kwargs = self.model_for(task)
        if "task_ids" in kwargs:
            kwargs["task_ids"] = kwargs["task_ids"].expand(ids.shape[0])
        x = torch.from_numpy(ids).to(self.device)
        m = torch.from_numpy(mask).to(self.device)
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.inference_mode(), autocast:
            if new_tokens:
                out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=self.pad_id, use_cache=True, **kwargs)
                start = 1 if self.family.encoder_decoder else ids.shape[1]  # seq2seq: the decoder start token
                return out[:, start:].cpu().tolist()
            logits = model(input_ids=x, attention_mask=m, **kwargs).logits.float().cpu().numpy()
        if self.family.classifies:
            return list(logits)
        skip = self.skip[task]
        return [logits[i, skip:][mask[i].astype(bool)] for i in range(ids.shape[0])]

    def answers(self, rt: Runtime, prompts: list[str], task: str, new_tokens: int) -> list[dict]:
        """Greedy answers to one task's prompts as a server returns them: each row's new tokens up to and including
        its first end-of-sequence token (the model's, as rt generates by default; none: all new_tokens), and their
        text. The prompts are tokenized and padded as rt pads a batch of prompts."""
        from promptmux.runtime.generate import SamplingParams

        torch = self.torch
        eos = [int(x) for x in rt.generator.eos_for(SamplingParams())]
        enc = rt.tokenizer(prompts, padding=True, padding_side=rt.spec.family.prompt_padding, return_tensors="np")
        model, kwargs = self.model_for(task)
        if "task_ids" in kwargs:
            kwargs["task_ids"] = kwargs["task_ids"].expand(len(prompts))
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.inference_mode(), autocast:
            out = model.generate(input_ids=torch.from_numpy(enc["input_ids"]).to(self.device),
                                 attention_mask=torch.from_numpy(enc["attention_mask"]).to(self.device),
                                 max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos or None, pad_token_id=self.pad_id, use_cache=True, **kwargs)
        start = 1 if self.family.encoder_decoder else enc["input_ids"].shape[1]
        rows = []
        for new in out[:, start:].cpu().tolist():
            end = next((i for i, t in enumerate(new) if t in eos), None)
            new = new if end is None else new[:end + 1]
            rows.append({"token_ids": new, "text": rt.tokenizer.decode(new, skip_special_tokens=True)})
        return rows


def other_peft_systems(rt: Runtime, tasks: list[str], baselines, base=None, adapters=None,
                       device: str = "cpu") -> dict:
    """The non-fp32 PEFT baselines among `baselines` (--baseline peft-bf16 / peft-int8), whose held-out answers the
    accuracy benchmark reads too (a user's own PyTorch bf16 or int8, read as a contract reads a precision)."""
    return {name: PeftSystem(rt, tasks, base, adapters, device=device, precision=PEFT_BASELINES[name][0])
            for name in baselines if PEFT_BASELINES[name][0] != "fp32"}


def compare(ours: list, theirs: list, new_tokens: int) -> dict:
    """Row by row: generated tokens identical (generation), or logits' max abs difference and argmax agreement."""
    if new_tokens:
        same = [a == b for a, b in zip(ours, theirs)]
        return {"rows": len(same), "rows_differing": int(len(same) - sum(same)), "predictions_agree": all(same),
                "max_abs_diff": None}
    diffs, differing = [], 0
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        diffs.append(float(np.abs(a - b).max()))
        differing += int((a.argmax(-1) != b.argmax(-1)).any())
    return {"rows": len(diffs), "rows_differing": differing, "predictions_agree": differing == 0,
            "max_abs_diff": max(diffs) if diffs else None}
