"""Would keeping a few decoder layers fp32 let int8 weights meet a language model's labelled contract? The SmolLM2
demo's int8 decoder (MatMulNBits, runtime/quantize.py) made again with some MatMuls left fp32, each variant measured
by the labelled rule (runtime/precision.py) against fp32 ONNX Runtime on two disjoint sets of held-out prompts: the
first 100 of each task (what the demo's contract reads) and the next 100. A set of fp32 layers that passes on the
first and not on the second fits those rows, not the model: accuracy control for decoders, like the classifiers'
(runtime/accuracy_control.py), would be worth building only if it carried over.

Variants: "none" (every MatMul int8, as shipped), "head" (the LM head fp32), "layer:N" (decoder layer N's seven
MatMuls fp32: q, k, v, o, gate, up, down), joined by "+".

    python -m studies.decoder_fp32_layers out/smollm2-demo [--variants none;head;layer:0;layer:29;layer:0+layer:29]
        [--out results/decoder-fp32-layers-smollm2-....json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

PER_LAYER = 7  # a Llama decoder layer's weight MatMuls, in graph order


def _fp32_nodes(spec: str, matmuls: list[str]) -> list[str]:
    out = []
    for part in spec.split("+"):
        if part == "head":
            out.append(matmuls[-1])
        elif part.startswith("layer:"):
            n = int(part.removeprefix("layer:"))
            out += matmuls[PER_LAYER * n:PER_LAYER * (n + 1)]
        elif part != "none":
            raise ValueError(f"unknown variant part {part!r}")
    return out


def _make(deploy: Path, work: Path, spec: str) -> tuple[Path, int]:
    """A copy of the deployment whose decoder.int8.onnx keeps the variant's MatMuls fp32 (real copies: ONNX Runtime
    refuses linked external data), and how many were kept."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from promptmux.runtime import quantize as Q

    copy = work / "deploy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for f in deploy.iterdir():
        if f.is_file() and not f.name.startswith("decoder.int8"):
            shutil.copy(f, copy / f.name)
    model = onnx.load(str(deploy / "decoder.onnx"))
    Q.untie_lm_head(model)
    Q.gemms_to_matmuls(model)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    layers = json.loads((deploy / "config.json").read_text())["num_hidden_layers"]
    assert len(matmuls) == PER_LAYER * layers + 1, (len(matmuls), layers)  # seven a layer, then the LM head
    keep = _fp32_nodes(spec, matmuls)
    quantizer = MatMulNBitsQuantizer(model, bits=Q.BITS, block_size=Q.BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=Q.ACCURACY_LEVEL, nodes_to_exclude=keep)
    quantizer.process()
    Q._save_beside(quantizer.model.model, copy / "decoder.int8.onnx")
    shutil.copy(deploy / "decoder.int8.json", copy / "decoder.int8.json")  # the shipped stamp: this copy is used
    return copy, len(keep)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.decoder_fp32_layers", description=__doc__.split("\n")[0])
    p.add_argument("deploy", type=Path, help="the SmolLM2 demo, its int8 decoder made (precision int8 opened once)")
    p.add_argument("--variants", default="none;head;layer:0;layer:29;layer:0+layer:29")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info
    from promptmux.demo.smollm2 import TASKS, calibration_prompts
    from promptmux.runtime import precision as P

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    every = calibration_prompts(per_task=200)  # each task's held-out prompts with answers, as the demo gives them
    assert every, "the SmolLM2 held-out data is not here (see promptmux.demo.smollm2.held_out)"
    sets = {"first 100": (0, 100), "next 100": (100, 200)}
    rows = {name: [r for t in TASKS for r in [x for x in every if x["task"] == t][lo:hi]]
            for name, (lo, hi) in sets.items()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variants.split(";"):
            copy, kept = _make(args.deploy, Path(tmp), spec)
            rt = Runtime(copy, backend="onnxruntime", precision="int8", threads=args.threads)
            row = {"variant": spec, "fp32_matmuls": kept, "sets": {}}
            for name, labelled in rows.items():
                report = P.measure(rt, exact, labelled=labelled, tasks=list(TASKS))
                row["sets"][name] = {"passed": P.passed(report), "misses": P.misses(report),
                                     "tasks": {t: {k: r[k] for k in ("accuracy_fp32", "accuracy",
                                                                     "prediction_agreement")}
                                               for t, r in report.items()}}
            assert set(rt.graph_runs) == {"decoder.int8.onnx"}, rt.graph_runs  # the variant's graph ran
            results.append(row)
            print(json.dumps(row), flush=True)
            del rt
    result = {"command": "python -m studies.decoder_fp32_layers " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(args.threads), "reference": "onnxruntime/fp32", "rule": dict(P.LABELLED),
              "sets": {name: list(r) for name, r in sets.items()}, "rows": results}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
