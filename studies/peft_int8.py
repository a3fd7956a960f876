"""What a user's own PyTorch int8 does to PEFT's answers: dynamic int8 per tensor (quantize_dynamic's default) and
per channel (what `promptmux bench --baseline peft-int8` runs), against PEFT fp32 on the demo's held-out sets.

    python -m studies.peft_int8 DEPLOY [--threads 2] [--out results/....json]
    python -m promptmux.bench.isa_cap avx2 -- python -m studies.peft_int8 DEPLOY ...   (as on Zen 3)

DEPLOY: the demo deployment (`promptmux demo --out DIR`); its tasks' recorded adapters and base model are loaded as
`promptmux bench`'s PEFT baseline loads them. The accuracy benchmark's rows (`promptmux bench --accuracy`: the
held-out rows after the demo's calibration rows), one task per batch of 32, as that benchmark runs PEFT. Per
variant and task: accuracy, and the share of PEFT fp32's predictions kept, the figures promptmux's labelled contract
reads. No timing: the speed of the per-channel baseline is `promptmux bench`'s to measure (each system in its own
process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def predictions(peft, examples: list, pad_id: int) -> dict[str, list[int]]:
    """{task: predicted label per example, in order}."""
    import numpy as np

    from promptmux.bench.accuracy import peft_answers

    by_task: dict[str, list[int]] = {}
    for i, (task, _, _) in enumerate(examples):
        by_task.setdefault(task, []).append(i)
    logits, _ = peft_answers(peft, examples, by_task, pad_id, 32)
    return {t: [int(np.argmax(logits[i])) for i in idx] for t, idx in by_task.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.peft_int8", description=__doc__.split("\n\n")[0])
    ap.add_argument("deploy", type=Path, help="the demo deployment (promptmux demo --out DIR)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args(argv)

    import json

    import torch

    from promptmux import Runtime
    from promptmux.bench.accuracy import demo_tasks, held_out
    from promptmux.bench.baseline import PeftSystem, quantize_linear_int8
    from promptmux.bench.machine import machine_info
    from promptmux.core.archs import pad_id as graph_pad_id
    from promptmux.core.quiet import quiet_libraries

    quiet_libraries(all_warnings=True)  # transformers' notes on the head PEFT then loads
    torch.set_num_threads(args.threads)
    rt = Runtime(args.deploy, backend="onnxruntime", threads=1)  # the tasks, tokenizer and recorded adapters
    tasks = demo_tasks(rt)
    if not tasks:
        sys.exit(f"{args.deploy}: no demo task; give the deployment `promptmux demo` writes")
    examples = [e for t in tasks for e in held_out(t, rt.tokenizer)]
    labels = {t: [y for task, _, y in examples if task == t] for t in tasks}
    pad_id = graph_pad_id(rt.config)
    reference = predictions(PeftSystem(rt, tasks), examples, pad_id)
    variants = {"fp32": reference}
    for name, per_channel in (("int8 per tensor", False), ("int8 per channel", True)):
        peft = PeftSystem(rt, tasks)
        layers = sum(quantize_linear_int8(torch, m, per_channel) for m in {id(m): m for m in peft.models.values()}
                     .values())
        assert layers and not any(type(m) is torch.nn.Linear for m in peft.models[next(iter(peft.models))].modules())
        variants[name] = predictions(peft, examples, pad_id)
    result = {"command": "python -m studies.peft_int8 " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(args.threads), "examples": {t: len(v) for t, v in labels.items()},
              "variants": {}}
    for name, got in variants.items():
        result["variants"][name] = {t: {
            "accuracy": round(sum(a == y for a, y in zip(got[t], labels[t])) / len(labels[t]), 4),
            "kept": round(sum(a == b for a, b in zip(got[t], reference[t])) / len(labels[t]), 4)} for t in tasks}
        print(f"{name:18s} " + "  ".join(f"{t}: accuracy {v['accuracy']:.4f}, kept {100 * v['kept']:.2f} %"
                                         for t, v in result["variants"][name].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
