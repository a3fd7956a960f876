"""Would int8 serve the demo classifiers? ONNX Runtime int8 variants of the MiniLM graph on the held-out sets.

The bar (issue 12): keep at least 99.5 % of fp32's predictions on both demo tasks. Each variant quantizes the
deployment's graph with ONNX Runtime and answers the held-out examples in mixed batches, like fp32 does; its
predictions are compared with fp32's (the same graph unquantized), and the speed of both is timed at B=32.

    python -m studies.int8_classifier out/minilm-demo [--out results/int8-classifier.json]

Variants: dynamic int8 weights and activations per tensor (quantize_dynamic's defaults), and per channel; and
weight-only int8 with int8 compute (MatMulNBits, accuracy level 4: activations quantized per row and block).
Every full-sequence graph of the deployment is quantized (model.onnx, and model_noprefix.onnx, which prompt-only
batches such as the demo's run), both sessions are swapped, and the study asserts that every batch ran a quantized
graph (Runtime.graph_runs and a call count per swapped session): an earlier version swapped only model.onnx while
the batches ran model_noprefix.onnx, and so compared fp32 with fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _variants(deploy: Path, work: Path) -> dict[str, dict[str, Path]]:
    """variant -> {graph file: its quantized copy}, for every full-sequence graph the deployment has."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graphs = [g for g in ("model.onnx", "model_noprefix.onnx") if (deploy / g).is_file()]
    out = {}
    for name, kwargs in (("dynamic-per-tensor", {}), ("dynamic-per-channel", {"per_channel": True})):
        out[name] = {}
        for graph in graphs:
            path = work / name / graph
            path.parent.mkdir(parents=True, exist_ok=True)
            quantize_dynamic(str(deploy / graph), str(path), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], use_external_data_format=True, **kwargs)
            out[name][graph] = path
    # Weight-only int8 with int8 compute (MatMulNBits, accuracy level 4, what precision int8 runs for decoding):
    # its activations are quantized per row and per block of 32 inputs, not with one scale for the whole batch.
    import shutil

    from promptmux.runtime.quantize import weight_only_int8

    work_nbits = work / "weight-only-blocks"
    work_nbits.mkdir()
    for f in deploy.iterdir():
        if f.name.startswith(("model.onnx", "model_noprefix.onnx")):
            shutil.copy(f, work_nbits / f.name)
    out["weight-only-blocks"] = {graph: weight_only_int8(work_nbits / graph) for graph in graphs}
    return out


class Counted:
    """A session that counts its calls: the study checks that the quantized graphs are what ran."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def run(self, feeds, bank_key=None):
        self.calls += 1
        return self.session.run(feeds, bank_key)

    def __getattr__(self, name):
        return getattr(self.session, name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.int8_classifier", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.accuracy import demo_tasks, held_out
    from promptmux.bench.machine import machine_info
    from promptmux.runtime.sessions import OrtSession

    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    examples = [e for t in demo_tasks(exact) for e in held_out(t, exact.tokenizer, calibration_rows=True)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(examples))  # the tasks interleaved: mixed batches, as served
    examples = [examples[i] for i in order]

    def predictions(rt) -> np.ndarray:
        out = []
        for i in range(0, len(examples), 32):
            chunk = examples[i:i + 32]
            width = max(len(ids) for _, ids, _ in chunk)
            ids = np.zeros((len(chunk), width), np.int64)
            mask = np.zeros_like(ids)
            for r, (_, row, _) in enumerate(chunk):
                ids[r, :len(row)], mask[r, :len(row)] = row, 1
            out += [int(x.argmax()) for x in rt.forward(ids, mask, [t for t, _, _ in chunk])]
        return np.asarray(out)

    def seconds(rt) -> float:
        ids = np.full((32, 64), 1000, np.int64)
        tasks = [examples[i][0] for i in range(32)]
        rt.forward(ids, np.ones_like(ids), tasks)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            rt.forward(ids, np.ones_like(ids), tasks)
            best = min(best, time.perf_counter() - t)
        return best

    labels = np.asarray([y for _, _, y in examples])
    tasks = np.asarray([t for t, _, _ in examples])
    want = predictions(exact)
    base_s = seconds(exact)
    rows = [{"variant": "fp32", "agreement": {t: 1.0 for t in set(tasks)}, "accuracy":
             {t: float((want[tasks == t] == labels[tasks == t]).mean()) for t in sorted(set(tasks))},
             "b32_ms": round(1e3 * base_s, 1), "speedup": 1.0}]
    fp32_sessions = (exact.session, exact.noprefix_session)
    with tempfile.TemporaryDirectory() as tmp:
        for name, paths in _variants(Path(args.deploy), Path(tmp)).items():
            # the same runtime, its quantized graphs
            swapped = {g: Counted(OrtSession(path, args.threads)) for g, path in paths.items()}
            exact.session = swapped["model.onnx"]
            exact.noprefix_session = swapped.get("model_noprefix.onnx")
            before = dict(exact.graph_runs)
            got = predictions(exact)
            s = seconds(exact)
            ran = {g: exact.graph_runs[g] - before.get(g, 0) for g in exact.graph_runs}
            by_file = {sess.graph_file: sess for sess in swapped.values()}  # graph_runs names the file that ran
            assert ran and all(by_file[g].calls == n for g, n in ran.items() if n), (ran, swapped)
            rows.append({"variant": name, "graphs_ran": {g: n for g, n in ran.items() if n},
                         "agreement": {t: float((got[tasks == t] == want[tasks == t]).mean()) for t in sorted(set(tasks))},
                         "accuracy": {t: float((got[tasks == t] == labels[tasks == t]).mean()) for t in sorted(set(tasks))},
                         "b32_ms": round(1e3 * s, 1), "speedup": round(base_s / s, 2)})
            print(json.dumps(rows[-1]), flush=True)
    exact.session, exact.noprefix_session = fp32_sessions
    result = {"command": "python -m studies.int8_classifier " + " ".join(argv or []),
              "machine": machine_info(args.threads), "examples": {t: int((tasks == t).sum()) for t in sorted(set(tasks))},
              "bar": "agreement >= 0.995 on both tasks", "rows": rows,
              "kept": [r["variant"] for r in rows[1:] if min(r["agreement"].values()) >= 0.995]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
