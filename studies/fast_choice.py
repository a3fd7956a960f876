"""precision="fast"'s choice made several times over on one deployment: does it stay put where two candidates tie?

    python -m studies.fast_choice DEPLOY [--repeats 3] [--threads 2] [--out results/fast-choice-....json]

DEPLOY: a classifier deployment whose candidates' contracts are recorded for this CPU (for example
`promptmux demo --out DIR --precision fast`). It is copied to a temporary folder and fast.choose runs there
`--repeats` times, each time timing every candidate that met its contract against fp32 (each in a process of its
own, runtime/timing.py). Each run records the choice, the candidate that was fastest in that run (the choice before
fast.TIE), every candidate's speedup and share of fp32's answers kept, and the graphs each timing ran (graph_runs:
an int8 candidate must have run its int8 graph, the others none). On an AMX Xeon bf16 and OpenVINO's int8 tie:
the fastest alone flipped between them from run to run (results/fast-choice-timed-apart-minilm-intel-amx.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.fast_choice", description=__doc__.splitlines()[0])
    p.add_argument("deploy", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from promptmux import Runtime
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.runtime import fast
    from promptmux.runtime.timing import CLASSIFIER_SHAPES

    load_start = load_average()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "deploy"
        shutil.copytree(args.deploy, deploy, symlinks=False)  # copies of the graphs: the original stays as it was
        for i in range(args.repeats):
            record = fast.choose(deploy, args.threads, None, Runtime)
            timed = {n: f for n, f in record["candidates"].items() if "speedup_vs_fp32" in f}
            for name, f in timed.items():  # each timing ran its own graph
                assert f["graph_runs"] and all(("int8" in g) == name.startswith("int8") for g in f["graph_runs"]), f
            assert not any("int8" in g for g in record["fp32_graph_runs"] or ())
            runs.append({"choice": record["choice"],
                         "fastest": max(timed, key=lambda n: timed[n]["speedup_vs_fp32"]) if timed else None,
                         "reason": record["reason"],
                         "candidates": {n: {k: f.get(k) for k in ("contract_passed", "kept", "speedup_vs_fp32",
                                                                  "speedups", "graph_runs")}
                                        for n, f in record["candidates"].items()}})
            print(f"run {i + 1}: {record['choice']} (fastest: {runs[-1]['fastest']}); "
                  + ", ".join(f"{n} {f['speedup_vs_fp32']}x kept {f['kept']}" for n, f in timed.items()), flush=True)
    result = {"command": "python -m studies.fast_choice " + " ".join(sys.argv[1:] if argv is None else argv),
              "tie": fast.TIE, "shapes": [list(s) for s in CLASSIFIER_SHAPES],
              "machine": machine_info(args.threads), "load_average": [load_start, load_average()], "runs": runs,
              "choices": sorted({r["choice"] for r in runs}), "fastest": sorted({r["fastest"] for r in runs})}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
