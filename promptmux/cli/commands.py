"""The commands that export, check, run and serve a deployment (`tasks` and `init-adapter`: cli.tasks)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from promptmux.cli.common import (
    PRECISION_CHOICES,
    CliError,
    open_runtime,
    parse_pairs,
    read_texts,
    tasks_per_row,
)


def cmd_export(args) -> int:
    from promptmux.export.deploy import export_deployment
    from promptmux.runtime.precision import calibration_texts

    texts = calibration_texts(args.calibration) if args.calibration else None
    precisions = [p for p in (args.precision or "").split(",") if p]
    bad = [p for p in precisions if p not in PRECISION_CHOICES]
    if bad:
        raise CliError(f"--precision takes {', '.join(PRECISION_CHOICES)} (comma-separated), got {', '.join(bad)}")
    out = export_deployment(args.base, parse_pairs(args.adapter, "--adapter"), args.out, fold=args.fold,
                            overwrite=args.overwrite, optimize=args.ort_optimize, quiet=args.quiet,
                            generation_only=args.generation_only)
    contracts = {}
    if texts and not precisions:  # kept for the contracts measured at a later open, as --precision would keep them
        from promptmux.runtime.calibration import check_rows, given_items
        from promptmux.runtime.precision import keep_texts
        from promptmux.runtime.runtime import Runtime

        items, rt = given_items(texts), Runtime(out, backend="onnxruntime")
        try:  # checked as a contract would check them (its tasks served, a classifier's rows labelled)
            check_rows(rt, items)
        except ValueError as e:  # a failed export leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
            raise CliError(f"{args.calibration}: {e}") from None
        keep_texts(out, items, rt.bank)
    fast = None
    if precisions:
        from promptmux.runtime.runtime import Runtime

        try:
            for precision in precisions:  # measured now and recorded in the manifest (a miss warns, --strict fails)
                rt = Runtime(out, precision=precision, strict=args.strict, calibration=texts)
                contracts[f"{rt.backend}/{rt.precision}"] = rt.contract["passed"] if rt.contract else "exact"
                fast = {"chose": rt.fast["precision"], "reason": rt.fast["reason"]} if precision == "fast" else fast
        except BaseException:  # a failed export leaves nothing behind: --strict refusing a precision included
            shutil.rmtree(out, ignore_errors=True)
            raise
    from promptmux.core.folder import read_bank

    manifest = json.loads((out / "manifest.json").read_text())
    result = {"deployment": str(out), "tasks": read_bank(out, manifest).names(), "folded": manifest["folded"]}
    if contracts:
        result["precision_contracts_passed"] = contracts  # by the backend and precision that ran
    if fast:
        result["fast"] = fast
    print(json.dumps(result, indent=2))
    return 0


def cmd_run(args) -> int:
    import numpy as np

    texts = read_texts(args)
    tasks = tasks_per_row(args.task, len(texts), "texts")
    rt = open_runtime(args, forward=True, base=args.base)
    if rt.spec.family.classifies:
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

    worst = verify(args.deploy, args.base, parse_pairs(args.adapter, "--adapter"), backend=args.backend,
                   quiet=args.quiet)
    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_config

    tokens = not arch_for(load_base_config(args.deploy)).family.forward_rows  # verified on generated tokens
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
    tasks = tasks_per_row(args.task, len(args.prompt), "--prompt")
    rt = open_runtime(args, base=args.base, threads=args.threads)
    greedy = args.temperature == 0  # as the server reads it: temperature 0 is greedy, whatever top-k or top-p say
    kwargs = dict(do_sample=not greedy and (args.temperature is not None or args.top_k > 0 or args.top_p < 1.0),
                  temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  stop=args.stop or (), precompute=not args.no_precompute, own_positions=args.own_positions)
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
    from promptmux.export.trt_engine import build_deployment_engines

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    if not (Path(args.deploy) / "manifest.json").is_file():
        raise CliError(f"{args.deploy} is not a promptmux deployment (no manifest.json); run promptmux export")
    for flag in ("max_batch", "max_seq", "max_prompt", "max_past"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        from promptmux.core.trt_compat import import_tensorrt

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
                           persist_tasks=args.persist_tasks, bank_cache_mb=args.bank_cache_mb,
                           kv_cache_mb=args.kv_cache_mb, allow_inline_prompts=args.allow_inline_prompts,
                           served_model_name=args.served_model_name,
                           max_inflight=args.max_inflight, max_queue_wait=args.max_queue_wait,
                           header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                           max_header_bytes=args.max_header_bytes, docs=args.docs, grpc_port=args.grpc_port)
    if not (Path(args.deploy) / "manifest.json").is_file():
        raise CliError(f"{args.deploy} is not a promptmux deployment (no manifest.json); run promptmux export")
    if args.grpc_port is not None:
        if args.ray:
            raise CliError("--grpc-port serves from one process; with --ray, use KServe v2 over HTTP (/v2/...)")
        if not 0 <= args.grpc_port <= 65535:
            raise CliError(f"--grpc-port takes a port from 0 (any free one) to 65535, got {args.grpc_port}")
        from promptmux.runtime.server.kserve_grpc import stubs

        try:
            stubs()
        except RuntimeError as e:
            raise CliError(str(e)) from None
    if args.multiplex_tasks and not args.ray:
        raise CliError("--multiplex-tasks routes between Ray Serve replicas: add --ray (and --replicas N)")
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
        if args.multiplex_tasks < 0:
            raise CliError(f"--multiplex-tasks takes 0 (off) or more tasks per replica, got {args.multiplex_tasks}")
        if autoscaling is not None and not isinstance(autoscaling, dict):
            raise CliError("--autoscaling takes a JSON object, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
        serve_on_ray(args.deploy, options, host=args.host, port=args.port, replicas=args.replicas,
                     autoscaling=autoscaling, replica_cpus=args.replica_cpus, multiplex_tasks=args.multiplex_tasks)
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
    from promptmux.bench.harness import run_from_args
    from promptmux.bench.report import summary_table

    out = Path(args.out)  # checked before minutes of measuring, not after
    if out.is_dir() or not out.parent.resolve().is_dir() or not os.access(out.parent.resolve(), os.W_OK):
        raise CliError(f"--out {args.out}: cannot write a file there (a folder, or a folder that is missing or "
                       "read-only); name a file in a writable folder")

    if args.many_tasks:
        from promptmux.bench.many_tasks import run as many_tasks

        try:
            counts = [int(x) for x in args.many_tasks.split(",")]
        except ValueError:
            raise CliError(f"--many-tasks takes comma-separated task counts, got {args.many_tasks!r}") from None
        if any(not 2 < n <= 1_000_000 for n in counts):
            raise CliError("--many-tasks counts must lie in 3..1000000 (each is measured against 2 tasks)")
        result = many_tasks(Path(args.deploy), counts, rounds=args.repeats, threads=args.threads)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({n: r.get("vs_2_tasks") for n, r in result["sizes"].items()}, indent=1))
        return 0

    print(summary_table(run_from_args(args)))
    return 0
