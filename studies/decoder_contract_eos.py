"""A decoder's accuracy contract with and without end-of-sequence: how much of fp32's greedy tokens a precision keeps
when every row generates 16 tokens past its answer, against rows that end where the model ends them (as served).

Token agreement (runtime/precision.py: the share of a row's tokens equal to fp32's up to the first divergence,
averaged over rows) of each system against fp32 ONNX Runtime, on two kinds of calibration prompts: generated token
ids (what a deployment without calibration texts measures on) and the SmolLM2 demo's held-out prompts
(studies.generation_accuracy.held_out, format_input applied). OpenVINO fp32 is there to show the floor: two exact
engines. The first rows of each task, 16 new tokens, batches of 16, as the contract runs them.

    python -m studies.decoder_contract_eos out/smollm2-demo [--systems openvino/fp32,onnxruntime/int8]
        [--prompts 64] [--out results/decoder-contract-eos-smollm2-....json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.decoder_contract_eos", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--systems", default="openvino/fp32,onnxruntime/int8")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info
    from promptmux.demo.smollm2 import format_input
    from promptmux.runtime import precision as P
    from promptmux.runtime.calibration import generated_ids

    from .generation_accuracy import held_out

    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    tasks = list(exact.tasks)
    real = {t: [format_input(text) for task, text, _ in held_out() if task == t][:args.prompts] for t in tasks}
    ids, mask = generated_ids(exact, P.CALIBRATION_PROMPTS, 16)
    inputs = {"generated token ids": {t: {"input_ids": ids, "attention_mask": mask} for t in tasks},
              "held-out prompts": real}
    ends = {"16 tokens, end-of-sequence ignored": {"eos_token_id": []}, "rows end at end-of-sequence": {}}
    want = {(i, e): {t: [r["token_ids"] for chunk in P._chunks(x[t])
                         for r in exact.generate(chunk, t, max_new_tokens=P.CALIBRATION_NEW_TOKENS, **kw)]
                     for t in tasks}
            for i, x in inputs.items() for e, kw in ends.items()}
    rows, contracts = [], {}
    for system in args.systems.split(","):
        backend, _, precision = system.partition("/")
        rt = Runtime(args.deploy, backend=backend, precision=precision or "fp32", threads=args.threads)
        assert rt.backend == backend and rt.precision == (precision or "fp32"), (rt.backend, rt.precision)
        contracts[system] = rt.contract  # measured at open on generated token ids (no calibration texts given)
        for (i, e), reference in want.items():
            got = {t: [r["token_ids"] for chunk in P._chunks(inputs[i][t])
                       for r in rt.generate(chunk, t, max_new_tokens=P.CALIBRATION_NEW_TOKENS, **ends[e])]
                   for t in tasks}
            rows.append({"system": system, "prompts": i, "rows": e,
                         "token_agreement": {t: round(P._prefix_agreement(got[t], reference[t]), 4) for t in tasks},
                         "fp32_tokens_per_row": {t: round(float(np.mean([len(w) for w in reference[t]])), 2)
                                                 for t in tasks}})
            print(json.dumps(rows[-1]), flush=True)
        # the decoder graph the system stands for ran (int8: its own copy; graph_runs counts prompt batches)
        assert rt.graph_runs and all(("int8" in g) == (precision == "int8") for g in rt.graph_runs), rt.graph_runs
    result = {"command": "python -m studies.decoder_contract_eos " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(args.threads), "reference": "onnxruntime/fp32",
              "threshold": P.THRESHOLDS["token_agreement"], "rows": rows, "contracts": contracts}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
