"""Which precision decodes fastest depends on the work: precision fast times a language model at one generation
shape (runtime/timing.GENERATION_SHAPES); is the order of its candidates the same at others?

Each configuration (fp32 ONNX Runtime, ONNX Runtime's int8 weights, OpenVINO's bf16 where the CPU has bf16) is
opened in a process of its own and timed by runtime/timing.time_apart, the processes alternating round by round,
at several (prompts, prompt tokens, new tokens) shapes: fast's own, decode-heavy ones and a prefill-heavy one like
the SmolLM2 demo's answers (16 prompts, about 48 tokens, 4 new tokens). The graphs each ran are asserted
(graph_runs: decoder.int8.onnx for int8 only; OpenVINO's bf16 compiles decoder.onnx's IR in bf16 and counts as
decoder.onnx). The deployment's contracts must be recorded already
(a timing child measures nothing; `promptmux demo --model smollm2 --precision fast` records both).

    python -m studies.decoder_shapes DEPLOY [--threads 2] [--rounds 5] [--out results/decoder-shapes-....json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SHAPES = ((4, 16, 16), (1, 16, 32), (8, 16, 32), (16, 48, 4))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.decoder_shapes", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.runtime import cpu
    from promptmux.runtime.timing import GENERATION_SHAPES, time_apart

    load_start = load_average()
    configs = {"fp32": {"backend": "onnxruntime", "threads": args.threads},
               "int8": {"backend": "onnxruntime", "precision": "int8", "threads": args.threads}}
    flags = cpu.cpu_flags() or {}
    if flags.get("amx_bf16") or flags.get("avx512_bf16"):  # where OpenVINO runs bf16 (fast's own candidates)
        configs["bf16"] = {"backend": "openvino", "precision": "bf16", "threads": args.threads}
    timed = time_apart(args.deploy, configs, SHAPES, rounds=args.rounds)
    for name, t in timed.items():  # every batch ran the graph this configuration stands for
        assert t["graph_runs"] and all(("int8" in g) == (name == "int8") for g in t["graph_runs"]), (name, t)
    fp32 = timed["fp32"]["seconds"]
    speedups = {name: {"x".join(map(str, s)): round(f / x, 3) for s, f, x in zip(SHAPES, fp32, t["seconds"])}
                for name, t in timed.items() if name != "fp32"}
    geomean = {name: round(math.exp(sum(math.log(v) for v in s.values()) / len(s)), 3) for name, s in speedups.items()}
    result = {"command": "python -m studies.decoder_shapes " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()],
              "fast_shapes": [list(s) for s in GENERATION_SHAPES], "shapes": [list(s) for s in SHAPES],
              "seconds": {n: t["seconds"] for n, t in timed.items()},
              "rounds": {n: t["rounds"] for n, t in timed.items()},
              "graph_runs": {n: t["graph_runs"] for n, t in timed.items()},
              "speedup_vs_fp32": speedups, "geomean_vs_fp32": geomean}
    print(json.dumps({"speedup_vs_fp32": speedups, "geomean_vs_fp32": geomean}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
