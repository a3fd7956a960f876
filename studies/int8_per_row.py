"""ONNX Runtime's dynamic int8 with a scale per row (per token) instead of one per batch: answers kept on rows the
contract never saw, answers that change with the batch, and speed.

    python -m studies.int8_per_row DEPLOY [--threads 2] [--out results/....json]
    python -m promptmux.bench.isa_cap avx2 -- python -m studies.int8_per_row DEPLOY ...   (as on Zen 3)

DEPLOY: the demo deployment (`promptmux demo --out DIR`). What `int8` runs quantizes each MatMul's input with one
scale for the whole batch (DynamicQuantizeLinear), taken from its largest value: a row's answer then depends on the
rows beside it, and the contract, measured in mixed batches too, needed 4 of 37 layers kept fp32 on AVX2
(README, "int8 answers and the batch"). Here each DynamicQuantizeLinear of the all-int8 graph is replaced by a
symmetric quantization with a scale per row (its largest magnitude / 127, zero point 128), written with standard
operators: the MatMulIntegers, weights and weight scales stay as they are. Variants, each in a copy of the
deployment: per batch (what `int8` runs, no layer kept fp32), per row with uint8 codes around 128, and per row with
int8 codes (zero point 0: int8 x int8 products). Each is measured against fp32 ONNX Runtime
on the calibration rows and on the held-out rows after them (mixed batches of 32, bench/accuracy), with how many
held-out answers change when their row runs alone, and timed against fp32 with each in a process of its own
(runtime/timing.time_apart; graph_runs asserted).

Measured on an AMD EPYC Zen 4 capped to AVX2 (results/int8-per-row-minilm-amd-zen4-capped-avx2.json), held-out
sentiment rows after the calibration rows: per batch kept 96.0 % of fp32's answers (39 of 800 change when their row
runs alone), 1.68x fp32 at 32 x 64; per row 94.9 % (none change alone), 1.48x; per row with int8 codes 96.1 %, 0.35x
(ONNX Runtime has no fast int8 x int8 kernel for AVX2). A row's own scale makes its answer independent of the batch
but keeps no more answers here and costs speed, so `int8` keeps the per-batch scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from studies.int8_fp32_layers import SHAPES  # the same four sizes, so the two studies compare

ZERO = 128  # the uint8 zero point of a symmetric quantization: codes 1..255 stand for -127..127 steps


def per_row(model, signed: bool = False) -> int:
    """Rewrite every DynamicQuantizeLinear(X) of `model` into a symmetric per-row quantization of X: scale
    max|X| / 127 over the last axis, shape [..., rows, 1]; the codes from one blocked QuantizeLinear (a block the
    width of the row: 4x faster than Div, Round, Add, Clip and Cast at 32 x 64 x 384, ad hoc). Returns how many were
    rewritten. signed: int8 codes -127..127 with zero point 0 (int8 x int8 products: on AVX2 ONNX Runtime's kernel
    multiplies |a| by b with a's sign, whose pairs stay under 16 bits) instead of uint8 codes 1..255 around 128."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    width = {}  # the row width each quantized input has: the first dimension of a weight it multiplies
    for n in g.node:
        if n.op_type == "MatMulInteger" and n.input[1] in inits:
            width.setdefault(n.input[0], inits[n.input[1]].dims[0])
    consts = {"pr_axes": np.array([-1], np.int64), "pr_tiny": np.array(1e-12, np.float32),
              "pr_127": np.array(127, np.float32), "pr_0": np.array(0, np.float32),
              "pr_zero_f": np.array(0 if signed else ZERO, np.float32),
              "pr_zero": np.array(0, np.int8) if signed else np.array(ZERO, np.uint8)}
    code = TensorProto.INT8 if signed else TensorProto.UINT8
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    # ONNX Runtime fuses MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) into MatMulIntegerToFloat, whose kernel
    # reads one a_scale for the whole batch (wrong here: its heads' features moved 5x as far from fp32's as without
    # the fusion, ad hoc). So the row scale is applied apart: Cast -> Mul(row scale) -> Mul(b_scale).
    quantizers = {n.output[1] for n in g.node if n.op_type == "DynamicQuantizeLinear"}
    producer = {o: n for n in g.node for o in n.output}
    rescale = {}  # Mul(a_scale, b_scale) output -> (a_scale, b_scale)
    for n in g.node:
        if n.op_type == "Mul" and n.input[0] in quantizers:
            rescale[n.output[0]] = (n.input[0], n.input[1])
    nodes, count = [], 0
    for n in g.node:
        if n.op_type == "Mul" and n.input[1] in rescale and producer.get(n.input[0]) is not None \
                and producer[n.input[0]].op_type == "Cast":
            a_scale, b_scale = rescale[n.input[1]]
            nodes += [helper.make_node("Mul", [n.input[0], a_scale], [f"{n.output[0]}.per_row"]),
                      helper.make_node("Mul", [f"{n.output[0]}.per_row", b_scale], list(n.output), name=n.name)]
            continue
        if n.op_type == "Mul" and n.output[0] in rescale:
            continue  # the product of the scales: no longer used
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        x, (q, scale, zero) = n.input[0], n.output
        p = f"{n.name}.per_row"
        nodes += [
            helper.make_node("Abs", [x], [f"{p}.abs"]),
            helper.make_node("ReduceMax", [f"{p}.abs", "pr_axes"], [f"{p}.max"], keepdims=1),
            helper.make_node("Max", [f"{p}.max", "pr_tiny"], [f"{p}.safe"]),
            helper.make_node("Div", [f"{p}.safe", "pr_127"], [scale]),
            # blocked QuantizeLinear wants a zero point of the scale's shape
            helper.make_node("Mul", [scale, "pr_0"], [f"{p}.zeros"]),
            helper.make_node("Add", [f"{p}.zeros", "pr_zero_f"], [f"{p}.zero_f"]),
            helper.make_node("Cast", [f"{p}.zero_f"], [f"{p}.zero"], to=code),
            helper.make_node("QuantizeLinear", [x, scale, f"{p}.zero"], [q], axis=-1, block_size=width[q]),
            helper.make_node("Identity", ["pr_zero"], [zero]),  # MatMulInteger takes one zero point for A
        ]
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.int8_per_row", description=__doc__.splitlines()[0])
    p.add_argument("deploy", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import onnx

    from promptmux.runtime.quantize import _save_beside

    def rewrite(signed):
        def apply(copy, graph, out, exact):
            model = onnx.load(str(out))
            count = per_row(model, signed=signed)
            _save_beside(model, out)  # the stamp still names the fp32 graph: the Runtime runs this copy
            return {"rewritten": count}
        return apply

    variants = {"per batch": None, "per row": rewrite(False), "per row, int8 codes": rewrite(True)}
    command = "python -m studies.int8_per_row " + " ".join(sys.argv[1:] if argv is None else argv)
    return measure(args.deploy, variants, args.threads, command, args.out)


def measure(deploy: Path, variants: dict, threads: int, command: str, out: Path | None) -> dict:
    """Each variant in a copy of `deploy` with every layer int8: None runs ONNX Runtime's dynamic int8 as made,
    a function (copy, fp32 graph path, int8 graph path, fp32 Runtime) -> facts rewrites the int8 graph first.
    Measured against fp32 on the calibration and held-out rows (mixed batches and alone), then timed apart."""
    import numpy as np

    from promptmux import Runtime
    from promptmux.bench.accuracy import deployment_answers, held_out
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.demo import CALIBRATION_ROWS
    from promptmux.runtime import cpu
    from promptmux.runtime.precision import LABELLED_FILE, calibration_texts
    from promptmux.runtime.quantize import int8_graph
    from studies.int8_fp32_layers import time_int8_variants

    load_start = load_average()
    rows = [r for r in calibration_texts(deploy / LABELLED_FILE) if isinstance(r, dict)]
    exact = Runtime(deploy, backend="onnxruntime", precision="fp32", threads=threads)
    tasks = sorted({r["task"] for r in rows})
    sets = {"calibration": [e for t in tasks for e in held_out(t, exact.tokenizer, CALIBRATION_ROWS, True)],
            "held_out": [e for t in tasks for e in held_out(t, exact.tokenizer)]}

    def answers(rt, examples):  # (predicted class per example in mixed batches, the same alone)
        mixed, alone = deployment_answers(rt, examples)[:2]
        return [int(np.argmax(x)) for x in mixed], [int(np.argmax(x)) for x in alone]

    def share(pairs):
        return round(float(np.mean(pairs)), 4)

    want = {name: answers(exact, examples)[0] for name, examples in sets.items()}
    result = {"command": command, "cpu": cpu.describe(), "machine": machine_info(threads),
              "shapes": [list(s) for s in SHAPES],
              "rows": {name: {t: sum(e[0] == t for e in ex) for t in tasks} for name, ex in sets.items()},
              "fp32_accuracy": {name: {t: share([w == e[2] for w, e in zip(want[name], ex) if e[0] == t])
                                       for t in tasks} for name, ex in sets.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        entries, configs = {}, {"fp32": {"backend": "onnxruntime", "precision": "fp32", "threads": threads}}
        for name, apply in variants.items():
            copy = Path(tmp) / name.replace(" ", "_").replace(",", "")
            shutil.copytree(deploy, copy)
            manifest = json.loads((copy / "manifest.json").read_text())
            manifest["precision"]["onnxruntime/int8"]["fp32_layers"] = []  # every layer int8
            (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
            entry = {}
            for graph in ("model_noprefix.onnx", "model.onnx"):
                made = int8_graph(copy / graph, True, ())
                if apply is not None:
                    entry[graph] = apply(copy, copy / graph, made, exact)
            rt = Runtime(copy, backend="onnxruntime", precision="int8", threads=threads)
            assert rt.int8_fp32_layers == (), rt.int8_fp32_layers
            for part, examples in sets.items():
                mixed, alone = answers(rt, examples)
                mine = [(m, a, w, e) for m, a, w, e in zip(mixed, alone, want[part], examples)]
                entry[part] = {t: share([m == w for m, _, w, e in mine if e[0] == t]) for t in tasks}
                entry[f"{part}_accuracy"] = {t: share([m == e[2] for m, _, _, e in mine if e[0] == t])
                                             for t in tasks}
                entry[f"{part}_changed_alone"] = {t: sum(m != a for m, a, _, e in mine if e[0] == t) for t in tasks}
            del rt
            entries[name] = entry
            configs[name] = {"deploy": str(copy), "backend": "onnxruntime", "precision": "int8", "threads": threads}
            print(name, entry, flush=True)
        fp32 = time_int8_variants(deploy, configs, entries)
    result.update(variants=entries, fp32_seconds=[round(s, 5) for s in fp32],
                  load_average=[load_start, load_average()])
    for name, entry in entries.items():
        print(name, entry["held_out"], entry["held_out_changed_alone"], entry["speedup_vs_fp32"])
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
