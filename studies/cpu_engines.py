"""Where the CPU time of a prompted encoder goes: the same MiniLM forward on four engines, each alone.

`promptmux bench` measures promptmux against PEFT in one process. This asks the next question when
promptmux is not faster: is it ONNX Runtime itself, or promptmux's graph? Each engine runs in its own
process (no thread pool of one engine spinning on the cores of the other), same threads, same shape:

* torch-sdpa:     the bare encoder in PyTorch eager (transformers' default SDPA attention), no prompt;
* ort-plain:      the bare encoder exported with torch.onnx (TorchScript exporter), ONNX Runtime, no prompt;
* ort-fused:      ort-plain after ORT's transformer optimizer (fused Attention, SkipLayerNorm, BiasGelu);
* promptmux:      the deployment's graph through Runtime.forward on ONNX Runtime, one task's prompt in front
                  (what it serves);
* promptmux-openvino: the same on OpenVINO (fp32).

The bare encoder runs S + virtual-token positions so that every engine does the same attention work.

    python -m studies.cpu_engines out/minilm-demo [--batch-sizes 1,8,32] [--seq-len 64] [--threads 2]
        [--task sentiment] [--out results/cpu-engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: `python -m studies.cpu_engines` runs from here
ENGINES = ("torch-sdpa", "ort-plain", "ort-fused", "promptmux", "promptmux-openvino")


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bare_onnx(base: str, work: Path, fused: bool) -> Path:
    """The bare encoder as ONNX (once per work folder), optionally through ORT's transformer optimizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    plain = work / "plain.onnx"
    if not plain.exists():
        model = AutoModel.from_pretrained(base, attn_implementation="eager").eval()

        class Encoder(torch.nn.Module):  # positional inputs: the TorchScript exporter passes them so
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ex = (torch.ones(2, 8, dtype=torch.long),) * 2 + (torch.zeros(2, 8, dtype=torch.long),)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(Encoder(model), ex, str(plain), input_names=names, output_names=["hidden"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=17, dynamo=False)
    if not fused:
        return plain
    out = work / "fused.onnx"
    if not out.exists():
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = AutoConfig.from_pretrained(base)
        optimize_model(str(plain), model_type="bert", num_heads=cfg.num_attention_heads,
                       hidden_size=cfg.hidden_size).save_model_to_file(str(out))
    return out


def measure(engine: str, deploy: str, batch: int, seq: int, threads: int, task: str, repeats: int, work: Path) -> dict:
    """One engine at one batch size, in this process."""
    import torch

    torch.set_num_threads(threads)
    manifest = json.loads((Path(deploy) / "manifest.json").read_text())
    base = manifest["base"]["path"]
    from promptmux.core.folder import read_bank

    virtual = read_bank(deploy).view(task).num_virtual_tokens
    rng = np.random.default_rng(0)
    if engine.startswith("promptmux"):
        from promptmux import Runtime

        backend = "openvino" if engine.endswith("openvino") else "onnxruntime"
        rt = Runtime(deploy, backend=backend, use_folded=False, threads=threads)
        ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        seconds = _time(lambda: rt.forward(ids, mask, [task] * batch), repeats)
    else:
        length = seq + virtual
        ids = rng.integers(1000, 20000, size=(batch, length)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        if engine == "torch-sdpa":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(base).eval()
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run():
                with torch.inference_mode():
                    model(**tensors)
            seconds = _time(run, repeats)
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            session = ort.InferenceSession(str(bare_onnx(base, work, engine == "ort-fused")), so,
                                           providers=["CPUExecutionProvider"])
            seconds = _time(lambda: session.run(None, feeds), repeats)
    return {"engine": engine, "batch_size": batch, "positions": seq + virtual, "ms": 1e3 * seconds,
            "requests_per_s": batch / seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m studies.cpu_engines", description=__doc__.split("\n")[0])
    p.add_argument("deploy", help="an encoder deployment (e.g. promptmux demo --out out/minilm-demo)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="JSON to write (and the Markdown table beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # engine,batch,work: one measurement, JSON to stdout
    args = p.parse_args(argv)
    if args.child:
        engine, batch, work = args.child.split(",", 2)
        print(json.dumps(measure(engine, args.deploy, int(batch), args.seq_len, args.threads, args.task,
                                 args.repeats, Path(work))))
        return []
    manifest = json.loads((Path(args.deploy) / "manifest.json").read_text())
    if manifest["base"].get("family") != "encoder":
        raise SystemExit(f"{args.deploy}: cpu_engines compares encoder classifiers; this deployment is "
                         f"{manifest['base'].get('family')}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for engine in ENGINES:
                cmd = [sys.executable, "-m", "studies.cpu_engines", str(Path(args.deploy).resolve()), "--seq-len", str(args.seq_len),
                       "--threads", str(args.threads), "--task", args.task, "--repeats", str(args.repeats),
                       "--child", f"{engine},{batch},{work}"]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # ROOT: studies is importable
                if done.returncode != 0:
                    raise SystemExit(f"{engine} at B={batch} failed:\n{done.stderr[-2000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"B={batch:>3} {engine:<11} {row['ms']:9.1f} ms  {row['requests_per_s']:8.1f} req/s", flush=True)
    if args.out:
        from promptmux.bench.machine import machine_info

        command = "python -m studies.cpu_engines " + shlex.join(argv if argv is not None else sys.argv[1:])
        result = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(args.threads), "seq_len": args.seq_len,
                  "task": args.task, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
        m = result["machine"]
        lines = ["# CPU engines: the encoder forward alone on each engine", "", f"`{command}`", "",
                 f"{time.strftime('%Y-%m-%d')}; {m['cpu_model']} ({m['cores']} cores), {args.threads} threads, "
                 f"load average at start {m['load_average_start']}; " + ", ".join(f"{k} {v}" for k, v in
                                                                             m["versions"].items()), "", "| B | positions | engine | ms (median) | req/s | vs torch-sdpa |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            ref = next(x for x in rows if x["batch_size"] == r["batch_size"] and x["engine"] == "torch-sdpa")
            lines.append(f"| {r['batch_size']} | {r['positions']} | {r['engine']} | {r['ms']:.1f} | "
                         f"{r['requests_per_s']:.1f} | {ref['ms'] / r['ms']:.2f}x |")
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
