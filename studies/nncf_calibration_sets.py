"""How much NNCF int8's held-out agreement with fp32 depends on the rows it calibrated on, against how much its
settings move it (the demo classifiers; issue 21's 97 % rule).

The demo's held-out rows of each task split three ways: A, the first 200 (the rows the labelled contract measures,
which `fast` calibrates OpenVINO's int8 on), B, the next 200, and C, the rest (600 sentiment, 100 topic rows). Each
variant (studies.nncf_int8.PTQ: SmoothQuant's alpha, activation ranges) is quantized once calibrated on A and once on
B (each on its own copy of the deployment, its IR written over the converted one, the batches asserted to run it),
and every set's predictions are compared with fp32 ONNX Runtime's, in mixed batches of 32. Kept on C, which no
variant calibrated on, says how the int8 does on new rows; A against B says how far the same recipe moves with the
200 rows it saw.

    python -m studies.nncf_calibration_sets DEMO_DEPLOY [--variants nncf-ptq,nncf-ptq-sq0.8] [--calibrate-on A,B]
        [--out results/nncf-calibration-sets-minilm-....json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.nncf_calibration_sets", description=__doc__.split("\n")[0])
    p.add_argument("deploy")
    p.add_argument("--variants", default="nncf-ptq,nncf-ptq-sq0.9,nncf-ptq-sq0.8,nncf-ptq-sq0.6")
    p.add_argument("--calibrate-on", default="A,B", help="sets to calibrate on: A, B, or AB (both)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.accuracy import demo_tasks, held_out
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.demo import CALIBRATION_ROWS

    from .nncf_int8 import PTQ, predictions, quantize_nncf, ran

    load_start = load_average()
    exact = Runtime(args.deploy, backend="onnxruntime", threads=args.threads)
    by_task = {t: held_out(t, exact.tokenizer, calibration_rows=True) for t in demo_tasks(exact)}
    rng = np.random.default_rng(0)

    def mixed(rows):  # the tasks interleaved: mixed batches, as served
        return [rows[i] for i in rng.permutation(len(rows))]

    n = CALIBRATION_ROWS
    sets = {"A": mixed([e for rows in by_task.values() for e in rows[:n]]),
            "B": mixed([e for rows in by_task.values() for e in rows[n:2 * n]]),
            "C": mixed([e for rows in by_task.values() for e in rows[2 * n:]])}
    calibrations = {"A": sets["A"], "B": sets["B"], "AB": mixed(sets["A"] + sets["B"])}
    want = {name: predictions(exact, rows) for name, rows in sets.items()}

    def kept(rt, name: str) -> dict:
        rows = sets[name]
        got, tasks = predictions(rt, rows), np.array([t for t, _, _ in rows])
        return {t: round(float((got[tasks == t] == want[name][tasks == t]).mean()), 4) for t in by_task}

    work = Path(tempfile.mkdtemp(prefix="nncf-calibration-sets-"))
    rows = []
    try:
        for variant in args.variants.split(","):
            if variant not in PTQ:
                raise SystemExit(f"unknown variant {variant!r}: one of {', '.join(PTQ)}")
            for cal in args.calibrate_on.split(","):
                folder = work / f"{variant}-{cal}"
                shutil.copytree(args.deploy, folder)
                seconds = quantize_nncf(folder, variant, calibrations[cal], args.threads)
                rt = Runtime(folder, backend="openvino", threads=args.threads)
                row = {"variant": variant, "calibrated_on": cal, "quantize_seconds": round(seconds, 1),
                       "kept": {name: kept(rt, name) for name in sets}}
                assert ran(rt) == {"model_noprefix.onnx"}, dict(rt.graph_runs)  # the variant's IR, written over it
                rows.append(row)
                print(json.dumps(row), flush=True)
                del rt
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python -m studies.nncf_calibration_sets " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()],
              "rows_per_set": {name: {t: sum(e[0] == t for e in s) for t in by_task} for name, s in sets.items()},
              "reference": "fp32 ONNX Runtime", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
