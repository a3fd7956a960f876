"""The SmolLM2 demo tasks answered by generation at each precision: held-out accuracy and agreement with fp32.

The held-out split is the one scripts/train_smollm2_adapters.py held out (same data, seed and sizes); the
answer is the first word of 4 greedy tokens, as that script scores it. Every precision answers the same prompts
in mixed-task batches of 16; its tokens are compared with fp32 ONNX Runtime's, row by row.

    python -m studies.generation_accuracy out/smollm2-demo [--systems onnxruntime/fp32,onnxruntime/int8]
        [--out results/generation-accuracy-smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TASKS = ("sentiment", "topic")


def held_out() -> list[tuple[str, str, str]]:
    """(task, text, label) of both demo tasks' held-out examples (promptmux.demo.smollm2.held_out)."""
    from promptmux.demo.smollm2 import held_out as split

    return split()


def answers(rt, examples, batch: int = 16) -> tuple[list[list[int]], list[str], float]:
    from promptmux.demo.smollm2 import format_input

    tokens, words, started = [], [], time.perf_counter()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        out = rt.generate([format_input(t) for _, t, _ in chunk], [task for task, _, _ in chunk], max_new_tokens=4)
        for r in out:
            tokens.append(r["token_ids"])
            first = r["text"].strip().split()
            words.append(first[0].strip(".,!:;\"'").lower() if first else "")
    return tokens, words, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.generation_accuracy",
                                description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--systems", default="onnxruntime/fp32,openvino/fp32,onnxruntime/int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info

    examples = held_out()
    order = np.random.default_rng(0).permutation(len(examples))  # the tasks interleaved: mixed batches
    examples = [examples[i] for i in order]
    from promptmux.demo.smollm2 import calibration_prompts

    tasks = np.asarray([task for task, _, _ in examples])
    labels = [label for _, _, label in examples]
    reference = None
    rows = []
    for system in args.systems.split(","):
        backend, _, precision = system.partition("/")
        # its contract measured as the demo measures it: each task on its first held-out prompts, with their answers
        rt = Runtime(args.deploy, backend=backend, precision=precision or "fp32", threads=args.threads,
                     calibration=calibration_prompts() if precision not in ("", "fp32") else None)
        tokens, words, seconds = answers(rt, examples)
        # the decoder graph the system stands for ran (int8: its own copy; graph_runs counts prompt batches)
        assert rt.graph_runs and all(("int8" in g) == (precision == "int8") for g in rt.graph_runs), rt.graph_runs
        if reference is None:
            reference = tokens
        correct = np.asarray([w == y for w, y in zip(words, labels)])
        same = np.asarray([a == b for a, b in zip(tokens, reference)])
        rows.append({"system": system, "accuracy": {t: round(float(correct[tasks == t].mean()), 4) for t in TASKS},
                     "rows_identical_to_first": {t: round(float(same[tasks == t].mean()), 4) for t in TASKS},
                     "seconds": round(seconds, 1), "contract": rt.contract})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "contract"}), flush=True)
    result = {"command": "python -m studies.generation_accuracy " + " ".join(argv or []),
              "machine": machine_info(args.threads), "examples": {t: int((tasks == t).sum()) for t in TASKS},
              "reference": rows[0]["system"], "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
