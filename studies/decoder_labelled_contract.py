"""A language model's labelled contract against how many rows it reads: each non-exact precision of the SmolLM2 demo
measured by the labelled rule (runtime/precision.py: accuracy within 0.5 point of fp32's, at least 97 % of fp32's
answers kept; an answer is the text a row generates, right when it starts with the row's label) on the first 32
(what the demo read at first), 100 (what it reads now) and 200 (all) held-out prompts of each task.

With 32 rows a task one changed answer is 96.9 % kept, under 97 %, and one answer lost is 3.1 points: the rule then
passes only a precision that changes nothing there. The study shows what more rows decide.

A system peft/PRECISION is PEFT itself (bench/baseline.PeftSystem: fp32, bf16 autocast, or PyTorch's dynamic int8),
read by the same rule: what a user who assembles PEFT and PyTorch would serve, generating up to end-of-sequence.

    python -m studies.decoder_labelled_contract out/smollm2-demo [--systems onnxruntime/int8,openvino/bf16,peft/int8]
        [--rows 32,100,200] [--out results/decoder-labelled-contract-smollm2-....json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class PeftAnswers:
    """PEFT (one of bench/baseline's PEFT systems) behind Runtime.generate's signature, answering as served
    (PeftSystem.answers: greedy, each row ending at the model's end-of-sequence)."""

    def __init__(self, exact, precision: str, threads: int):
        import torch

        from promptmux.bench.baseline import PeftSystem

        torch.set_num_threads(threads)
        self.exact = exact
        self.system = PeftSystem(exact, exact.bank.names(), precision=precision)
        self.graph_runs: dict[str, int] = {}  # what ran: the PEFT system's name, once per batch

    def generate(self, prompts: list[str], task: str, max_new_tokens: int) -> list[dict]:
        self.graph_runs[self.system.name] = self.graph_runs.get(self.system.name, 0) + 1
        return [{"task": task, **r} for r in self.system.answers(self.exact, prompts, task, max_new_tokens)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.decoder_labelled_contract", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--systems", default="onnxruntime/int8,openvino/bf16")
    p.add_argument("--rows", default="32,100,200", help="held-out prompts per task, each count measured apart")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info
    from promptmux.demo.smollm2 import TASKS, calibration_prompts
    from promptmux.runtime import precision as P

    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    every = calibration_prompts(per_task=10**9)  # each task's held-out prompts with answers, as the demo gives them
    assert every, "the SmolLM2 held-out data is not here (see promptmux.demo.smollm2.held_out)"
    rows = {t: [r for r in every if r["task"] == t] for t in TASKS}
    results = []
    for system in args.systems.split(","):
        backend, _, precision = system.partition("/")
        if backend == "peft":
            rt = PeftAnswers(exact, precision, args.threads)
        else:
            rt = Runtime(args.deploy, backend=backend, precision=precision, threads=args.threads)
            assert (rt.backend, rt.precision) == (backend, precision), (rt.backend, rt.precision)
        for n in (int(x) for x in args.rows.split(",")):
            started = time.perf_counter()
            before = dict(rt.graph_runs)
            report = P.measure(rt, exact, labelled=[r for t in TASKS for r in rows[t][:n]], tasks=list(TASKS))
            ran = {g: c - before.get(g, 0) for g, c in rt.graph_runs.items() if c > before.get(g, 0)}
            # the decoder graph the system stands for ran (int8: its own copy; graph_runs counts prompt batches)
            if backend == "peft":
                assert list(ran) == [rt.system.name], ran
            else:
                assert ran and all(("int8" in g) == (precision == "int8") for g in ran), ran
            results.append({"system": system, "rows_per_task": n, "graph_runs": ran, "passed": P.passed(report),
                            "misses": P.misses(report), "seconds": round(time.perf_counter() - started, 1),
                            "tasks": {t: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                      for t, r in report.items()}})
            print(json.dumps(results[-1]), flush=True)
    result = {"command": "python -m studies.decoder_labelled_contract " +
                         " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(args.threads), "reference": "onnxruntime/fp32",
              "rule": dict(P.LABELLED), "held_out_per_task": {t: len(rows[t]) for t in TASKS}, "rows": results}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
