"""Held-out accuracy of a language model's demo as a benchmark: the SmolLM2 demo's tasks (`promptmux demo --model
smollm2`), whose answers are the text each prompt generates.

The held-out prompts are the ones scripts/train_smollm2_adapters.py held out (promptmux.demo.smollm2.held_out), less
each task's first CALIBRATION_PER_TASK: a non-exact precision's contract is measured on those. Each prompt generates
greedily up to the model's end-of-sequence, at most the contract's new tokens; an answer is right when its text
starts with the label (runtime.calibration.gives_answer) and kept when its tokens are PEFT fp32's. Every side answers
each prompt alone, as the server answers it: its continuous batching places each row's positions as if the row ran
alone, whereas in a padded batch PEFT (and Runtime.generate, which keeps PEFT's rules) counts a prompt-tuned row's
padding among its positions, so a row's answer depends on its batch's lengths (SmolLM2 demo, exact: 7 of 100
sentiment answers changed between a mixed batch of 16 and alone). Those changes are reported too ("batch_changes":
the deployment's answers in mixed batches of the tasks' prompts, interleaved). The result has the classifier
benchmark's shape (accuracy.py), with "generation": True and no logit difference; --baseline peft-bf16 / peft-int8
are read the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from promptmux.runtime.batch import round_robin
from promptmux.runtime.precision import CALIBRATION_NEW_TOKENS

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime

Example = tuple[str, str, str]  # (task, prompt, label)


def lm_demo_tasks(rt: Runtime) -> list[str]:
    """The deployment's tasks that are the shipped SmolLM2 demo adapters (by name and recorded source)."""
    from promptmux.demo.smollm2 import ADAPTERS, TASKS

    found = []
    for name in rt.tasks:
        source = rt.bank.view(name).source if name in TASKS else None
        if source and Path(source).resolve() == (ADAPTERS / name).resolve():
            found.append(name)
    return found


def held_out_prompts(tasks: list[str], limit: int | None = None) -> list[Example]:
    """(task, prompt, label) of each task's held-out prompts after the contract's, up to limit a task."""
    from promptmux.demo.smollm2 import CALIBRATION_PER_TASK, format_input, held_out

    rows = held_out()
    return [(task, format_input(text), label) for task in tasks
            for text, label in [(t, y) for k, t, y in rows if k == task][CALIBRATION_PER_TASK:][:limit]]


def deployment_answers(rt: Runtime, examples: list[Example], by_task: dict[str, list[int]], batch_size: int
                       ) -> tuple[list, list, float]:
    """The deployment's answers ({"token_ids", "text"}) each prompt alone, the seconds they took, and its answers
    in mixed batches (the tasks' prompts, by_task, interleaved round-robin)."""
    n = CALIBRATION_NEW_TOKENS
    t = time.perf_counter()
    alone = [rt.generate([prompt], [task], max_new_tokens=n)[0] for task, prompt, _ in examples]
    seconds = time.perf_counter() - t
    order = round_robin(list(by_task.values()))
    batched: list = [None] * len(examples)
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        for i, answer in zip(rows, rt.generate([examples[i][1] for i in rows], [examples[i][0] for i in rows],
                                               max_new_tokens=n)):
            batched[i] = answer
    return alone, batched, seconds


def peft_answers(peft, rt: Runtime, examples: list[Example]) -> tuple[list, float]:
    """A PEFT system's answers, each prompt alone, and the seconds they took."""
    t = time.perf_counter()
    answers = [peft.answers(rt, [prompt], task, CALIBRATION_NEW_TOKENS)[0] for task, prompt, _ in examples]
    return answers, time.perf_counter() - t


def compare_answers(rt: Runtime, peft, examples: list[Example], batch_size: int = 16,
                    others: dict | None = None) -> dict:
    """Deployment vs PEFT fp32 on the same prompts, each alone (and the deployment's in mixed batches of
    batch_size); and each of `others` against PEFT fp32, as a contract reads a precision: its accuracy and the
    share of PEFT fp32's answers kept."""
    from promptmux.runtime.calibration import gives_answer

    by_task: dict[str, list[int]] = {}
    for i, (task, _, _) in enumerate(examples):
        by_task.setdefault(task, []).append(i)
    ours, batched, ours_s = deployment_answers(rt, examples, by_task, batch_size)
    theirs, theirs_s = peft_answers(peft, rt, examples)

    def right(answers: list, idx: list[int]) -> float:
        return round(float(np.mean([gives_answer(answers[i]["text"], examples[i][2]) for i in idx])), 4)

    def same(a: list, b: list, idx: list[int]) -> np.ndarray:
        return np.array([a[i]["token_ids"] == b[i]["token_ids"] for i in idx])

    tasks = {task: {"examples": len(idx), "accuracy_promptmux": right(ours, idx), "accuracy_peft": right(theirs, idx),
                    "differing_predictions": int((~same(ours, theirs, idx)).sum()),
                    "batch_changes": int((~same(ours, batched, idx)).sum()),
                    "accuracy_promptmux_batched": right(batched, idx)}
             for task, idx in by_task.items()}
    n = len(examples)
    result = {"generation": True, "new_tokens": CALIBRATION_NEW_TOKENS, "tasks": tasks, "batch_size": batch_size,
              "answered": "each prompt alone (batch_size: the mixed batches of batch_changes)",
              "promptmux_examples_per_s": round(n / ours_s, 2), "peft_examples_per_s": round(n / theirs_s, 2),
              "speedup": round(theirs_s / ours_s, 3)}
    if others:
        result["baselines"] = {}
        for name, other in others.items():
            got, got_s = peft_answers(other, rt, examples)
            result["baselines"][name] = {
                "examples_per_s": round(n / got_s, 2),
                "tasks": {task: {"examples": len(idx), "accuracy": right(got, idx),
                                 "accuracy_peft": tasks[task]["accuracy_peft"],
                                 "kept": round(float(same(got, theirs, idx).mean()), 4)}
                          for task, idx in by_task.items()}}
    return result


def lm_plan(rt: Runtime, limit: int | None) -> tuple[list[str], list[Example], Path, str]:
    """What accuracy.accuracy reads for a language model: the SmolLM2 demo's tasks in rt's deployment, their
    held-out prompts, the adapters' training metrics and the split's description."""
    from promptmux.demo.smollm2 import ADAPTERS, CALIBRATION_PER_TASK

    tasks = lm_demo_tasks(rt)
    if not tasks:
        raise ValueError("the accuracy benchmark knows the held-out data of the demo tasks only; for a language "
                         "model, the SmolLM2 demo's (sentiment, topic exported from promptmux/demo/smollm2_adapters): "
                         "benchmark the deployment `promptmux demo --model smollm2` writes")
    split = ("scripts/train_smollm2_adapters.py split, held_out_examples from "
             f"promptmux/demo/smollm2_adapters/metrics.json after the {CALIBRATION_PER_TASK} per task the demo's "
             "precision contract measures" + (f", the next {limit} per task" if limit else ""))
    return tasks, held_out_prompts(tasks, limit), ADAPTERS / "metrics.json", split
