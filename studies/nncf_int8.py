"""NNCF's static int8 (OpenVINO) against what `precision="int8"` runs (ONNX Runtime dynamic int8 with accuracy
control) for the demo classifiers: speed and held-out accuracy on this CPU (issue 21, item 1).

    python -m studies.nncf_int8 DEMO_DEPLOY [--threads 2] [--rounds 5] [--out results/nncf-int8-....json]

DEMO_DEPLOY: the MiniLM demo deployment (`promptmux demo --out DIR`) on which `--precision int8` has run once (its
manifest holds the int8 contract and the layers accuracy control keeps fp32). Variants, each on its own copy of
the deployment:
- fp32-ort: the exact graph on ONNX Runtime (the reference for predictions and speed);
- ort-int8: Runtime(precision="int8"), as shipped;
- nncf-ptq: nncf.quantize(model_type=TRANSFORMER) of the OpenVINO IR of model_noprefix.onnx, calibrated on the
  demo's labelled calibration texts (the first 200 held-out rows of each task: the rows the int8 contract uses);
- nncf-ptq-no-sq: the same with SmoothQuant off; nncf-ptq-sq0.5 ... nncf-ptq-sq0.9: SmoothQuant at another MatMul
  alpha (NNCF's default for the transformer preset is 0.95); nncf-ptq-minmax: activation ranges the min and max over
  every calibration batch (the preset takes the mean of each batch's) (PTQ below);
- nncf-accuracy-control: nncf.quantize_with_accuracy_control, validated on the same rows (metric: the share of
  fp32's predictions kept), max_drop 0.005.
An NNCF variant's IR is written over the copy's converted IR, so Runtime(backend="openvino") compiles it; the study
asserts that the batches ran model_noprefix (graph_runs; OpenVINO's shape-specialised models of it compile from the
same IR) on a compiled model with int8 operations in it. Speed: each
variant timed in its own process at B = 1, 8, 32 x 64 tokens, the variants alternating round by round, medians.
Held-out predictions: the held-out rows of both tasks after the calibration rows (never calibrated on), mixed
batches of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = ((1, 64), (8, 64), (32, 64))
VARIANTS = ("fp32-ort", "ort-int8", "nncf-ptq", "nncf-ptq-no-sq", "nncf-accuracy-control")


def _advanced(**kwargs) -> dict:
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    return {"advanced_parameters": AdvancedQuantizationParameters(**kwargs)}


def _smooth_quant(alpha: float) -> dict:
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    return _advanced(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))


def _minmax() -> dict:
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return _advanced(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)


# nncf.quantize's arguments (beyond the transformer preset and the whole dataset) of each post-training variant.
# Beside what runtime/openvino_int8.py runs (nncf-ptq: SmoothQuant's MatMul alpha 0.95, activation ranges the mean
# of each batch's min and max, fast bias correction): SmoothQuant off or at a lower alpha, activation ranges the
# min and max over every batch (rare large rows not clipped). (The full bias correction, fast_bias_correction=False,
# fails inside NNCF 3.4 on these graphs: "'NoneType' object is not iterable" in BiasCorrection._get_fp_inputs.)
PTQ = {"nncf-ptq": dict, "nncf-ptq-no-sq": lambda: _smooth_quant(-1), "nncf-ptq-minmax": _minmax,
       **{f"nncf-ptq-sq{alpha}": (lambda a=alpha: _smooth_quant(a)) for alpha in (0.5, 0.6, 0.7, 0.8, 0.9)}}


def open_variant(folder: Path, variant: str, threads: int):
    from promptmux import Runtime

    if variant == "fp32-ort":
        return Runtime(folder, backend="onnxruntime", threads=threads)
    if variant == "ort-int8":
        return Runtime(folder, precision="int8", threads=threads)
    return Runtime(folder, backend="openvino", threads=threads)


def ran_graph(variant: str) -> str:
    """The graph file every batch of a variant must have run (an NNCF variant: its IR written over this one's)."""
    return "model_noprefix.int8.onnx" if variant == "ort-int8" else "model_noprefix.onnx"


def ran(rt) -> set[str]:
    """The graph files rt's batches ran, OpenVINO's shape-specialised models of a graph counted as that graph (they
    are compiled from the same IR: the variant's, written over the converted one)."""
    return {name.removesuffix(" (shape-specialised)") for name in rt.graph_runs}


def int8_ops(rt) -> int:
    """Operations the compiled OpenVINO model runs in int8 (0 for other backends)."""
    compiled = getattr(rt.noprefix_session, "compiled", None)
    if compiled is None:
        return 0
    return sum(op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8", "I8", "U8")
               for op in compiled.get_runtime_model().get_ops())


def timed(folder: Path, variant: str, threads: int) -> dict:
    """Median ms per batch at SIZES (this process: one variant)."""
    from promptmux.runtime.openvino_session import SPECIALIZE_AFTER, wait_for_specialisation

    rt = open_variant(folder, variant, threads)
    task = rt.tasks[0]
    out = {}
    for rows, tokens in SIZES:
        ids = np.full((rows, tokens), 1000, np.int64)
        mask = np.ones_like(ids)
        for _ in range(SPECIALIZE_AFTER):
            rt.forward(ids, mask, task)
        wait_for_specialisation()  # OpenVINO's model for this shape, compiled in the background: not timed
        rt.forward(ids, mask, task)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            rt.forward(ids, mask, task)
            times.append(time.perf_counter() - t)
        out[f"{rows}x{tokens}"] = 1e3 * statistics.median(times)
    assert ran(rt) == {ran_graph(variant)}, dict(rt.graph_runs)
    return {"ms": out, "int8_ops": int8_ops(rt)}


def _batches(examples, batch: int = 32):
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        width = max(len(ids) for _, ids, _ in chunk)
        ids = np.zeros((len(chunk), width), np.int64)
        mask = np.zeros_like(ids)
        for r, (_, row, _) in enumerate(chunk):
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
        yield chunk, ids, mask


def predictions(rt, examples) -> np.ndarray:
    return np.asarray([int(x.argmax()) for chunk, ids, mask in _batches(examples)
                       for x in rt.forward(ids, mask, [t for t, _, _ in chunk])])


def _captured(rt, examples) -> list[dict]:
    """{"feeds", "views", "labels"} per batch of 32: what the graph receives for these examples (captured from the
    runtime's own batching), with the rows' tasks and labels, for NNCF's calibration and validation."""
    items, session = [], rt.noprefix_session

    class Capture:
        input_names = session.input_names

        def run(self, feeds, bank_key=None):
            items.append({"feeds": {k: np.array(v) for k, v in feeds.items()}})
            return session.run(feeds, bank_key)

    rt.noprefix_session = Capture()
    for chunk, ids, mask in _batches(examples):
        rt.forward(ids, mask, [t for t, _, _ in chunk])
        items[-1].update(views=[rt.bank.view(t) for t, _, _ in chunk], labels=np.array([y for _, _, y in chunk]))
    rt.noprefix_session = session
    return items


def quantize_nncf(folder: Path, variant: str, calibration, threads: int) -> float:
    """Write the variant's int8 IR over the copy's converted IR of model_noprefix; the seconds NNCF took."""
    import nncf
    import openvino as ov

    from promptmux import Runtime
    from promptmux.runtime.batch import heads

    items = _captured(Runtime(folder, backend="openvino", threads=threads), calibration)  # converts the IR once
    xml = folder / "openvino" / "model_noprefix.xml"
    model = ov.Core().read_model(str(xml))
    names = [i.any_name for i in model.inputs]
    dataset = nncf.Dataset(items, lambda item: {n: item["feeds"][n] for n in names})
    # NNCF's subset_size counts dataset items, and an item here is a batch of 32 rows: all of them.
    common = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": len(items)}
    start = time.perf_counter()
    if variant in PTQ:
        q = nncf.quantize(model, dataset, **PTQ[variant](), **common)
    else:
        def accuracy(compiled, data) -> float:  # the labelled contract's metric: held-out accuracy, heads applied
            right = total = 0
            for item in data:
                out = compiled({n: item["feeds"][n] for n in names})[0]
                got = np.array([int(x.argmax()) for x in heads(item["views"], out)])
                right, total = right + int((got == item["labels"]).sum()), total + len(got)
            return right / total

        q = nncf.quantize_with_accuracy_control(model, dataset, dataset, accuracy, max_drop=0.005,
                                                drop_type=nncf.DropType.ABSOLUTE, **common)
    seconds = time.perf_counter() - start
    # The fp32 IR's weights are memory-mapped by read_model: write beside it and rename (writing over a mapped
    # file kills the process with SIGBUS).
    tmp = xml.with_name("nncf-" + xml.name)
    ov.save_model(q, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
    os.replace(tmp, xml)
    return seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.nncf_int8", description=__doc__.splitlines()[0])
    p.add_argument("deploy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out")
    p.add_argument("--time", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time:  # one variant's timing, in its own process
        print(json.dumps(timed(Path(args.time[0]), args.time[1], args.threads)))
        return {}
    from promptmux import Runtime
    from promptmux.bench.accuracy import demo_tasks, held_out
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.demo import CALIBRATION_ROWS

    load_start = load_average()
    variants = args.variants.split(",")
    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    by_task = {t: held_out(t, exact.tokenizer, calibration_rows=True) for t in demo_tasks(exact)}
    rng = np.random.default_rng(0)

    def mixed(rows):  # the tasks interleaved: mixed batches, as served
        return [rows[i] for i in rng.permutation(len(rows))]

    calibration = mixed([e for rows in by_task.values() for e in rows[:CALIBRATION_ROWS]])
    rest = mixed([e for rows in by_task.values() for e in rows[CALIBRATION_ROWS:]])  # never calibrated on
    tasks = np.array([t for t, _, _ in rest])
    labels = np.array([y for _, _, y in rest])
    want = predictions(exact, rest)
    work = Path(tempfile.mkdtemp(prefix="nncf-int8-"))
    rows, folders = {}, {}
    for variant in variants:
        folder = folders[variant] = work / variant
        shutil.copytree(args.deploy, folder)
        row = rows[variant] = {}
        if variant.startswith("nncf"):
            row["quantize_seconds"] = round(quantize_nncf(folder, variant, calibration, args.threads), 1)
        rt = open_variant(folder, variant, args.threads)
        got = predictions(rt, rest)
        assert ran(rt) == {ran_graph(variant)}, dict(rt.graph_runs)  # the graph this variant runs
        row["int8_ops"] = int8_ops(rt)
        assert row["int8_ops"] > 0 if variant.startswith("nncf") else True, "the NNCF IR did not run in int8"
        row.update({t: {"kept": round(float((got[tasks == t] == want[tasks == t]).mean()), 4),
                        "accuracy": round(float((got[tasks == t] == labels[tasks == t]).mean()), 4),
                        "fp32_accuracy": round(float((want[tasks == t] == labels[tasks == t]).mean()), 4)}
                    for t in by_task})
        print(variant, json.dumps(row), flush=True)
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            out = subprocess.run([sys.executable, "-m", "studies.nncf_int8", args.deploy, "--threads",
                                  str(args.threads), "--time", str(folders[variant]), variant],
                                 capture_output=True, text=True, check=True)
            times[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    for variant in variants:
        ms = {k: round(statistics.median(t[k] for t in times[variant]), 2) for k in times[variant][0]}
        rows[variant]["ms"] = ms
    base = rows["fp32-ort"]["ms"] if "fp32-ort" in rows else None
    for variant in variants:
        if base:
            rows[variant]["speedup_vs_fp32_ort"] = {k: round(base[k] / v, 2) for k, v in rows[variant]["ms"].items()}
    result = {"command": "python -m studies.nncf_int8 " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()],
              "examples": {"calibration": len(calibration), "evaluated": {t: int((tasks == t).sum()) for t in by_task}},
              "rows": rows}
    print(json.dumps({v: {k: r.get(k) for k in ("speedup_vs_fp32_ort",)} for v, r in rows.items()}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
