"""SmoothQuant before ONNX Runtime's dynamic int8: activation outliers moved into the weights, every layer int8.

    python -m studies.int8_smooth DEPLOY [--alphas 0.5,0.85] [--threads 2] [--out results/....json]
    python -m promptmux.bench.isa_cap avx2 -- python -m studies.int8_smooth DEPLOY ...   (as on Zen 3)

DEPLOY: the demo deployment (`promptmux demo --out DIR`). Dynamic int8 gives a MatMul's input one scale for the
batch, set by its largest value; a few channels with large values (after GELU above all: 3 of the 4 layers accuracy
control keeps fp32 on the demo, capped to AVX2, take GELU's output) leave the other channels few steps. SmoothQuant
divides each input channel j by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplies the weight's row j by
s_j: the product is unchanged, the channels' ranges come closer. Here the division is a Mul inserted before each
smoothed input's MatMuls (BERT's LayerNorm outputs also feed the residual, so it cannot be folded into them), the
maxima come from the contract's calibration rows run through fp32 (runtime/openvino_int8.calibration_feeds), and
ONNX Runtime's quantizer then makes the usual dynamic int8 graph of the smoothed one. Measured and timed like the
variants of studies/int8_per_row.py, against its all-int8 per-batch graph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def input_maxima(path: Path, feeds: list[dict]) -> dict:
    """{tensor: max |value| per channel (last axis)} of every weight MatMul's input, over the feeds, in fp32."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    inputs = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits})
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=x) for x in inputs if x not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    maxima: dict = {}
    for feed in feeds:
        for x, value in zip(inputs, session.run(inputs, {n: feed[n] for n in names})):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[x] = np.maximum(maxima[x], m) if x in maxima else m
    return maxima


def smooth(model, maxima: dict, alpha: float) -> int:
    """SmoothQuant `model` in place: for each weight MatMul input X with maxima, X / s feeds its weight MatMuls
    (one Mul) and each of their weights' rows j is multiplied by s_j. Returns how many inputs were smoothed."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and n.input[0] in maxima:
            consumers.setdefault(n.input[0], []).append(n)
    mul_before: dict[str, object] = {}
    for x, nodes in consumers.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_max = maxima[x]
        s = np.where((x_max > 0) & (w_max > 0), x_max ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        for n, w in zip(nodes, weights):
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32), f"{n.input[1]}.smoothed")
            g.initializer.append(scaled)
            n.input[1] = scaled.name
        inverse = numpy_helper.from_array((1 / s).astype(np.float32), f"{x}.smooth_inverse")
        g.initializer.append(inverse)
        mul_before[nodes[0].name] = helper.make_node("Mul", [x, inverse.name], [f"{x}.smoothed"],
                                                     name=f"{x}.smooth")
        for n in nodes:
            n.input[0] = f"{x}.smoothed"
    ordered = []
    for n in g.node:  # each Mul just before the first of its MatMuls (topological order kept)
        if n.name in mul_before:
            ordered.append(mul_before[n.name])
        ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return len(consumers)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.int8_smooth", description=__doc__.splitlines()[0])
    p.add_argument("deploy", type=Path)
    p.add_argument("--alphas", default="0.5,0.85")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import onnx

    from promptmux.runtime.openvino_int8 import calibration_feeds
    from promptmux.runtime.precision import LABELLED_FILE, calibration_texts
    from promptmux.runtime.quantize import _save_beside, quantize_matmuls, weight_matmuls
    from studies.int8_per_row import measure

    items = calibration_texts(args.deploy / LABELLED_FILE)
    maxima_of: dict[str, dict] = {}

    def smoothed(alpha):
        def apply(copy, graph, out, exact):
            if graph.name not in maxima_of:
                feeds = calibration_feeds(exact, graph, items, list(exact.tasks))
                maxima_of[graph.name] = input_maxima(graph, feeds) if feeds else {}
            if not maxima_of[graph.name]:  # a graph the calibration rows never run (no prefix task): as made
                return {"smoothed_inputs": 0}
            model = onnx.load(str(graph))
            count = smooth(model, maxima_of[graph.name], alpha)
            work = graph.with_name(f"smoothed.{graph.name}")
            _save_beside(model, work)
            quantize_matmuls(work, out, weight_matmuls(model.graph))  # every weight MatMul, Gemm too
            return {"smoothed_inputs": count, "alpha": alpha}
        return apply

    variants = {"per batch": None}
    variants.update({f"smoothed, alpha {a}": smoothed(float(a)) for a in args.alphas.split(",")})
    command = "python -m studies.int8_smooth " + " ".join(sys.argv[1:] if argv is None else argv)
    return measure(args.deploy, variants, args.threads, command, args.out)


if __name__ == "__main__":
    main()
