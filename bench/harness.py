"""`promptmux bench`: throughput per task, mixing cost, the PEFT eager baseline, task-count scaling, accuracy.

What a measured configuration is: a backend (or PEFT), a batch size B, a sequence length S (random token ids,
every row S real tokens), --new-tokens N (0: one full-sequence forward per request; classification: one row
classified; N > 0: greedy generation of exactly N tokens, EOS off), and a traffic mix over the chosen tasks:

- single:  every request uses one task; one run per task (what each task gets on its own);
- uniform: each request's task drawn uniformly at random (seeded);
- zipf:    task of rank k (the order of --tasks) drawn with probability proportional to 1/k^s (s = --zipf-s).

The request stream of a configuration is fixed (seeded) and identical for every system. promptmux takes the
requests in arrival order, B at a time, tasks mixed within a batch. PEFT serves one adapter per batch, so it
gets its best fair setup: the same requests grouped by task, then B at a time (its last batch of each task may
be smaller). Every system runs a warm-up (each distinct batch shape once), then --repeats rounds; a round runs
every system on every mix of one (B, S) once, in an order reversed every other round, so that load from other
processes hits all systems and mixes alike. A round is one pass over the stream (--requests N), or as many
passes as fit in --duration / --repeats seconds (at least one).

Figures per system and configuration: requests/s and tokens/s (median over rounds; tokens = real input tokens
for N = 0, generated tokens for N > 0), per task the same, latency p50/p95/p99 (a request's latency is the
time of the model call that answered it: batch service time, no queueing), and memory: the process's resident
set (psutil RSS sampled every 5 ms while the system runs; without psutil, getrusage ru_maxrss deltas). Both
systems live in one process, so the peak includes the other system's weights; the load deltas are reported
apart. Before timing, the first promptmux batch is compared row by row with PEFT's outputs for the same rows.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import generation
from .baseline import GPU_BACKENDS, compare

MIXES = ("single", "uniform", "zipf")
BACKENDS = ("auto", "onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt", "torch")
PRECISIONS = ("fp32", "bf16", "int8")
BASELINES = ("peft", "peft-bf16")  # PEFT eager fp32, and PEFT under torch.autocast(bfloat16)
DEFAULT_SEQ_LEN = {"encoder": 64, "decoder": 32, "seq2seq": 32}
SETTLE_S = 0.1  # idle between two systems' rounds, so one system's spinning worker threads do not slow the next


# ---- settings ------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    deploy: str
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    tasks: list[str] | None = None  # None: every task of the deployment
    mixes: list[str] = field(default_factory=lambda: ["single", "uniform"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] | None = None  # None: DEFAULT_SEQ_LEN of the family
    new_tokens: int = 0
    requests: int | None = None  # per round; None: max(32, 4 * B)
    duration: float | None = None  # seconds per system and configuration, split over the rounds
    repeats: int = 3
    precisions: list[str] = field(default_factory=lambda: ["fp32"])  # every backend runs each of them
    baselines: list[str] = field(default_factory=list)  # from BASELINES
    isolate: bool = True  # every system in its own process (two thread pools in one process spin against each other)
    threads: int = 0  # 0: every core
    seed: int = 0
    zipf_s: float = 1.0
    throughput: bool = True
    scaling: list[int] | None = None
    scaling_kinds: list[str] = field(default_factory=lambda: ["prompt", "mpt-factors", "mpt-composed"])
    scaling_batch_size: int = 8
    scaling_seq_len: int | None = None
    scaling_requests: int = 64
    scaling_virtual_tokens: int = 20
    scaling_mpt_rank: int = 1
    accuracy: bool = False
    accuracy_limit: int | None = None
    base: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    out: str = "promptmux-bench.json"
    quiet: bool = False

    def check(self) -> None:
        for b in self.backends:
            backend, _, precision = b.partition("/")
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
            if precision and precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r} in --backend {b}; choose from "
                                 f"{', '.join(PRECISIONS)}")
        for m in self.mixes:
            if m not in MIXES:
                raise ValueError(f"unknown mix {m!r}; choose from {', '.join(MIXES)}")
        if not self.backends or not self.mixes or not self.batch_sizes:
            raise ValueError("give at least one backend, mix and batch size")
        for what, values in (("batch size", self.batch_sizes), ("sequence length", self.seq_lens or [1]),
                             ("task count", self.scaling or [1])):
            if any(v < 1 for v in values):
                raise ValueError(f"every {what} must be a positive integer, got {values}")
        if self.new_tokens < 0:
            raise ValueError(f"--new-tokens must be >= 0, got {self.new_tokens}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be positive, got {self.requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"--duration must be positive, got {self.duration}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be positive, got {self.repeats}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)} (or none)")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
        if self.zipf_s <= 0:
            raise ValueError(f"--zipf-s must be positive, got {self.zipf_s}")
        if not (self.throughput or self.scaling or self.accuracy):
            raise ValueError("nothing to measure: --skip-throughput needs --scaling or --accuracy")

    def command(self) -> str:
        """The exact command line that reproduces this run (every setting spelled out)."""
        a = ["promptmux", "bench", self.deploy, "--backend", ",".join(self.backends)]
        if self.throughput:
            if self.tasks:
                a += ["--tasks", ",".join(self.tasks)]
            a += ["--mix", ",".join(self.mixes), "--batch-sizes", ",".join(map(str, self.batch_sizes))]
            if self.seq_lens:
                a += ["--seq-lens", ",".join(map(str, self.seq_lens))]
            a += ["--new-tokens", str(self.new_tokens)]
            if self.duration is not None:
                a += ["--duration", f"{self.duration:g}"]
            elif self.requests is not None:
                a += ["--requests", str(self.requests)]
            if self.precisions != ["fp32"]:
                a += ["--precision", ",".join(self.precisions)]
            if self.baselines:
                a += ["--baseline", ",".join(self.baselines)]
            if not self.isolate:
                a += ["--same-process"]
            if "zipf" in self.mixes and self.zipf_s != 1.0:
                a += ["--zipf-s", f"{self.zipf_s:g}"]
        else:
            a += ["--skip-throughput"]
        a += ["--repeats", str(self.repeats)]
        if self.threads:
            a += ["--threads", str(self.threads)]
        if self.seed:
            a += ["--seed", str(self.seed)]
        if self.scaling:
            a += ["--scaling", ",".join(map(str, self.scaling)), "--scaling-kinds", ",".join(self.scaling_kinds),
                  "--scaling-batch-size", str(self.scaling_batch_size), "--scaling-requests",
                  str(self.scaling_requests)]
            if self.scaling_seq_len:
                a += ["--scaling-seq-len", str(self.scaling_seq_len)]
        if self.accuracy:
            a += ["--accuracy"] + (["--accuracy-limit", str(self.accuracy_limit)] if self.accuracy_limit else [])
        if self.base:
            a += ["--base", self.base]
        for k, v in self.adapters.items():
            a += ["--adapter", f"{k}={v}"]
        a += ["--out", self.out]
        return shlex.join(a)


def _list(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        values = [cast(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {cast.__name__}, got {text!r}") from None
    return values


def settings_from_args(args) -> BenchSettings:
    """The CLI's namespace (promptmux/cli/parser.py, `bench`) -> settings."""
    adapters = {}
    for pair in args.adapter or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {pair!r}")
        adapters[name] = path
    s = BenchSettings(
        deploy=str(args.deploy), backends=_list(args.backend), tasks=_list(args.tasks), mixes=_list(args.mix),
        batch_sizes=_list(args.batch_sizes, int), seq_lens=_list(args.seq_lens, int), new_tokens=args.new_tokens,
        requests=args.requests, duration=args.duration, repeats=args.repeats,
        precisions=_list(args.precision or "fp32"),
        baselines=[b for b in _list(args.baseline or "") if b != "none"], isolate=not args.same_process,
        threads=args.threads or 0,
        seed=args.seed, zipf_s=args.zipf_s, throughput=not args.skip_throughput, scaling=_list(args.scaling, int),
        scaling_kinds=_list(args.scaling_kinds), scaling_batch_size=args.scaling_batch_size,
        scaling_seq_len=args.scaling_seq_len, scaling_requests=args.scaling_requests,
        accuracy=args.accuracy, accuracy_limit=args.accuracy_limit, base=args.base, adapters=adapters,
        out=str(args.out), quiet=bool(getattr(args, "quiet", False)))
    s.check()
    return s


# ---- traffic -------------------------------------------------------------------------------

def assign_tasks(mix: str, tasks: list[str], n: int, seed: int, zipf_s: float = 1.0) -> list[str]:
    """The task of each of n requests. single: all tasks[0]; uniform: i.i.d. uniform; zipf: rank k ∝ 1/k^s."""
    if not tasks:
        raise ValueError("no tasks to send requests to")
    if mix == "single":
        return [tasks[0]] * n
    rng = np.random.default_rng(seed)
    if mix == "uniform":
        idx = rng.integers(0, len(tasks), size=n)
    elif mix == "zipf":
        p = 1.0 / np.arange(1, len(tasks) + 1) ** zipf_s
        idx = rng.choice(len(tasks), size=n, p=p / p.sum())
    else:
        raise ValueError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")
    return [tasks[i] for i in idx]


@dataclass
class Workload:
    """A fixed request stream: row i of ids/mask is request i, sent to tasks[i]."""

    ids: np.ndarray
    mask: np.ndarray
    tasks: list[str]
    batch_size: int
    new_tokens: int

    def __len__(self) -> int:
        return len(self.tasks)

    def batches(self, grouped: bool) -> list[list[int]]:
        """Row indices per batch: arrival order (mixed tasks), or grouped by task first (one task per batch)."""
        b = self.batch_size
        if not grouped:
            return [list(range(i, min(i + b, len(self))) ) for i in range(0, len(self), b)]
        order: dict[str, list[int]] = {}
        for i, t in enumerate(self.tasks):
            order.setdefault(t, []).append(i)
        return [rows[i : i + b] for rows in order.values() for i in range(0, len(rows), b)]

    def tokens(self, rows: list[int]) -> int:
        """Tokens a batch accounts for: generated tokens (N > 0) or its real input tokens."""
        return len(rows) * self.new_tokens if self.new_tokens else int(self.mask[rows].sum())


def make_workload(vocab: int, pad_id: int, n: int, seq: int, tasks: list[str], batch_size: int, new_tokens: int,
                  seed: int) -> Workload:
    ids, mask = generation.make_batch(n, seq, vocab, pad_id, seed=seed, padded=False)
    return Workload(ids, mask, tasks, batch_size, new_tokens)


# ---- memory --------------------------------------------------------------------------------

MEMORY_METHOD_PSUTIL = "psutil RSS of this process, sampled every 5 ms"
MEMORY_METHOD_RUSAGE = "resource.getrusage ru_maxrss (lifetime peak RSS of this process), deltas"


def _rss(pid: int | None = None) -> int:
    """Resident set size of this process, or of process pid (a benchmark worker; needs psutil)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_method() -> str:
    try:
        import psutil  # noqa: F401

        return MEMORY_METHOD_PSUTIL
    except ImportError:
        return MEMORY_METHOD_RUSAGE


class RssSampler:
    """Peak resident set size while a block runs (a background thread samples it)."""

    def __init__(self, interval: float = 0.005, pid: int | None = None):
        self.interval = interval
        self.pid = pid
        self.start = self.peak = 0

    def __enter__(self):
        self.start = self.peak = _rss(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(self.pid))
        return False


MB = 1024 * 1024


# ---- measuring -----------------------------------------------------------------------------

def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3),
            "max": round(float(a.max()), 3)}


@dataclass
class _Runs:
    """What one system measured on one workload, over all rounds."""

    round_s: list[float] = field(default_factory=list)
    round_requests: list[int] = field(default_factory=list)
    round_tokens: list[int] = field(default_factory=list)
    round_task_requests: list[dict] = field(default_factory=list)
    round_task_tokens: list[dict] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # per request
    latency_task: list[str] = field(default_factory=list)
    peak_rss: int = 0
    rss_growth: int = 0
    batches: int = 0


def _one_pass(system, w: Workload, batches: list[list[int]], runs: _Runs, task_req: dict, task_tok: dict) -> int:
    tokens = 0
    for rows in batches:
        tasks = [w.tasks[i] for i in rows]
        if hasattr(system, "timed"):  # a worker process times its own call
            dt = 1e3 * system.timed(w.ids[rows], w.mask[rows], tasks, w.new_tokens)
        else:
            t = time.perf_counter()
            system.run(w.ids[rows], w.mask[rows], tasks, w.new_tokens)
            dt = 1e3 * (time.perf_counter() - t)
        runs.latency_ms.extend([dt] * len(rows))
        runs.latency_task.extend(tasks)
        n_tok = w.tokens(rows)
        tokens += n_tok
        for i, task in enumerate(tasks):
            task_req[task] = task_req.get(task, 0) + 1
            task_tok[task] = task_tok.get(task, 0) + n_tok // len(rows)
        runs.batches += 1
    return tokens


def warm_up(system, w: Workload) -> None:
    """Each distinct batch shape once (size, and the task of a single-task batch)."""
    seen = set()
    for rows in w.batches(system.grouped):
        tasks = {w.tasks[i] for i in rows}
        key = (len(rows), next(iter(tasks)) if len(tasks) == 1 else "mixed")
        if key not in seen:
            seen.add(key)
            system.run(w.ids[rows], w.mask[rows], [w.tasks[i] for i in rows], w.new_tokens)


def measure_jobs(jobs: list[tuple], repeats: int, duration: float | None, bar=None) -> list[_Runs]:
    """jobs: (system, workload) pairs. Round r runs every job once, in order (reversed every other round), so that
    load from other processes hits every system and every traffic mix alike."""
    runs = [_Runs() for _ in jobs]
    plans = [w.batches(system.grouped) for system, w in jobs]
    for r in range(repeats):
        for j in (range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs)))):
            system, w = jobs[j]
            time.sleep(SETTLE_S)
            rr = runs[j]
            task_req: dict[str, int] = {}
            task_tok: dict[str, int] = {}
            requests = tokens = 0
            with RssSampler(pid=system.pid) as mem:
                t0 = time.perf_counter()
                while True:
                    tokens += _one_pass(system, w, plans[j], rr, task_req, task_tok)
                    requests += len(w)
                    elapsed = time.perf_counter() - t0
                    if duration is None or elapsed >= duration / repeats:
                        break
            rr.round_s.append(elapsed)
            rr.round_requests.append(requests)
            rr.round_tokens.append(tokens)
            rr.round_task_requests.append(task_req)
            rr.round_task_tokens.append(task_tok)
            rr.peak_rss = max(rr.peak_rss, mem.peak)
            rr.rss_growth = max(rr.rss_growth, mem.peak - mem.start)
            if bar is not None:
                bar.update(1)
    return runs


def measure(systems: list, w: Workload, repeats: int, duration: float | None, bar=None) -> dict[str, _Runs]:
    """Interleaved rounds of every system on the same workload."""
    return {sy.name: r for sy, r in zip(systems, measure_jobs([(sy, w) for sy in systems], repeats, duration, bar))}


def summarize(r: _Runs) -> dict:
    rps = [n / s for n, s in zip(r.round_requests, r.round_s)]
    tps = [n / s for n, s in zip(r.round_tokens, r.round_s)]
    per_task = {}
    for task in r.round_task_requests[0]:
        t_rps = [d.get(task, 0) / s for d, s in zip(r.round_task_requests, r.round_s)]
        t_tps = [d.get(task, 0) / s for d, s in zip(r.round_task_tokens, r.round_s)]
        per_task[task] = {
            "requests": r.round_task_requests[0][task],
            "requests_per_s": round(statistics.median(t_rps), 3),
            "tokens_per_s": round(statistics.median(t_tps), 2),
            "latency_ms": percentiles([ms for ms, t in zip(r.latency_ms, r.latency_task) if t == task]),
        }
    return {
        "requests_per_round": r.round_requests[0],
        "rounds": len(r.round_s),
        "requests_per_s": round(statistics.median(rps), 3),
        "tokens_per_s": round(statistics.median(tps), 2),
        "latency_ms": percentiles(r.latency_ms),
        # the latency distribution for CDF plots: percentiles 0, 1, ..., 100 (ms)
        "latency_quantiles_ms": [round(float(x), 3) for x in np.percentile(np.asarray(r.latency_ms), np.arange(101))],
        "memory_mb": {"peak_rss": round(r.peak_rss / MB, 1), "rss_growth": round(r.rss_growth / MB, 1)},
        "per_task": per_task,
        "round_seconds": [round(x, 4) for x in r.round_s],
        "batches": r.batches,
    }


# ---- the run -------------------------------------------------------------------------------

def environment(threads: int, backends: list[str]) -> dict:
    """generation.machine_info (CPU, cores, versions, load) plus the accelerator, if a GPU backend runs."""
    import onnxruntime
    import torch

    m = generation.machine_info(threads)
    m["onnxruntime_providers"] = onnxruntime.get_available_providers()
    m["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    m["memory_method"] = memory_method()
    try:
        import psutil

        m["memory_total_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    return m


def device_of(backend: str, env: dict) -> str:
    if backend in GPU_BACKENDS:
        return f"GPU: {env.get('gpu') or 'unknown'}"
    threads = env["threads"]
    return f"CPU: {env['cpu_model']} ({env['cores']} cores, {threads} thread{'s' if threads != 1 else ''})"


def system_pairs(s: BenchSettings) -> list[tuple[str, str]]:
    """(backend, precision) of every promptmux system: BACKEND/PRECISION entries of --backend as given, plain
    BACKEND entries at each --precision."""
    pairs = []
    for entry in s.backends:
        backend, _, precision = entry.partition("/")
        pairs += [(backend, precision)] if precision else [(backend, p) for p in s.precisions]
    return list(dict.fromkeys(pairs))


def peft_device(s: BenchSettings) -> str:
    """Where the PEFT baselines run: on the GPU when the promptmux systems do."""
    return "cuda" if any(b.partition("/")[0] in GPU_BACKENDS for b in s.backends) else "cpu"


def build_systems(s: BenchSettings, meta) -> tuple[list, dict, object | None]:
    """Every system (each backend at each precision, then the baselines) before anything is measured: one that
    cannot run here is refused at once with the runtime's own message (what is missing, what to install).
    meta: a Runtime of the deployment (tasks, bank, config) for the baselines. Returns (systems, load deltas in
    MB, the PEFT fp32 system or None)."""
    from .isolated import IsolatedSystem, SystemSpec, build

    tasks = tuple(s.tasks or meta.tasks)
    specs = [SystemSpec("promptmux", s.deploy, s.threads, backend=b, precision=p, base=s.base)
             for b, p in system_pairs(s)]
    specs += [SystemSpec("peft", s.deploy, s.threads, bf16=b == "peft-bf16", tasks=tasks, base=s.base,
                         adapters=tuple(s.adapters.items()), device=peft_device(s)) for b in s.baselines]
    systems, load_mb = [], {}
    try:
        for spec in specs:
            if s.isolate:
                system = IsolatedSystem(spec)
                load_mb[system.name] = system.load_rss_mb
            else:
                before = _rss()
                system = build(spec, meta)
                load_mb[system.name] = round((_rss() - before) / MB, 1)
            systems.append(system)
    except BaseException:
        close_systems(systems)
        raise
    peft = next((sy for sy in systems if sy.backend == "peft-eager"), None)
    return systems, load_mb, peft


def close_systems(systems: list) -> None:
    for sy in systems:
        if hasattr(sy, "close"):
            sy.close()


def _progress(total: int, quiet: bool, desc: str = "bench"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="round", disable=quiet, leave=False)


def throughput(s: BenchSettings, rt, env: dict) -> dict:
    """Every (B, S, mix) configuration: each backend at each precision and the PEFT baselines on the same request
    stream. rt: a Runtime of the deployment, for its tasks, bank and config."""
    systems, load_mb, peft = build_systems(s, rt)  # refuses an unrunnable backend before anything else
    try:
        return _throughput(s, rt, env, systems, load_mb, peft)
    finally:
        close_systems(systems)


def _throughput(s, rt, env, systems, load_mb, peft) -> dict:
    family = rt.spec.family
    if family == "seq2seq" and not s.new_tokens:
        raise ValueError("a seq2seq deployment is benchmarked by generation: pass --new-tokens N (N > 0)")
    if family == "encoder" and s.new_tokens:
        raise ValueError("--new-tokens is for causal LM and seq2seq deployments; this one classifies")
    tasks = s.tasks or rt.tasks
    for t in tasks:
        rt.bank.view(t)  # UnknownTaskError names the deployment's tasks
    seq_lens = s.seq_lens or [DEFAULT_SEQ_LEN[family]]
    vocab = rt.dims.vocab_size
    cfg = rt.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
        cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    if rt.max_positions:
        longest = max(seq_lens) + max(rt.bank.view(t).num_virtual_tokens for t in tasks) + s.new_tokens
        if longest > rt.max_positions:
            raise ValueError(f"sequence length {max(seq_lens)} + virtual tokens + new tokens = {longest} exceed the "
                             f"model's {rt.max_positions} positions; pass smaller --seq-lens")

    for sy in systems:
        sy.prepare(s.new_tokens)
    baselines = [sy for sy in systems if sy.backend.startswith("peft")]

    runs_plan = []  # (mix, task list of the stream, label)
    for mix in s.mixes:
        if mix == "single":
            runs_plan += [("single", [t], t) for t in tasks]
        else:
            runs_plan.append((mix, tasks, None))
    configs = [(b, sq) for b in s.batch_sizes for sq in seq_lens]
    bar = _progress(len(configs) * len(runs_plan) * s.repeats * len(systems), s.quiet)
    rows, checks = [], []
    try:
        for ci, (b, sq) in enumerate(configs):
            n = s.requests or max(32, 4 * b)
            bar.set_postfix_str(f"B={b} S={sq}")
            streams = []  # (mix, its tasks, the single task or None, workload): every mix of this (B, S)
            for mi, (mix, stream_tasks, single) in enumerate(runs_plan):
                seed = s.seed + 1000 * ci + 17 * mi
                names = assign_tasks(mix, stream_tasks, n, seed, s.zipf_s)
                w = make_workload(vocab, pad_id, n, sq, names, b, s.new_tokens, seed)
                streams.append((mix, stream_tasks, single, w))
                for sy in systems:
                    warm_up(sy, w)
                if peft is not None:  # the first arrival-order batch, row by row, against PEFT on the same rows
                    first = w.batches(False)[0]
                    want = _grouped_outputs(peft, w, first)
                    for sy in systems:
                        if sy in baselines:
                            continue
                        got = sy.run(w.ids[first], w.mask[first], [w.tasks[i] for i in first], w.new_tokens)
                        checks.append({"backend": sy.backend, "batch_size": b, "seq_len": sq, "mix": mix,
                                       "task": single, **compare(got, want, w.new_tokens)})
            # Every mix and system of this (B, S) in the same rounds: mixed vs single-task is compared under the
            # same machine conditions, like promptmux vs PEFT.
            jobs = [(sy, st[3]) for st in streams for sy in systems]
            runs = iter(measure_jobs(jobs, s.repeats, s.duration, bar))
            for mix, stream_tasks, single, w in streams:
                for sy in systems:
                    baseline = sy in baselines
                    row = {"system": ("peft" if sy is peft else sy.backend) if baseline else "promptmux",
                           "backend": sy.backend, "precision": sy.precision,
                           "device": device_of(("onnxruntime-cuda" if peft_device(s) == "cuda" else "onnxruntime")
                                               if baseline else sy.backend, env),
                           "batch_size": b, "seq_len": sq, "new_tokens": s.new_tokens, "mix": mix, "task": single,
                           "tasks": sorted(set(w.tasks), key=stream_tasks.index)}
                    row.update(summarize(next(runs)))
                    rows.append(row)
    finally:
        bar.close()
    contracts = {sy.name: getattr(sy, "contract", None) or getattr(getattr(sy, "rt", None), "contract", None)
                 for sy in systems if sy.precision != "fp32"}
    chosen = {sy.name: getattr(sy, "backend_reason", None) or getattr(getattr(sy, "rt", None), "backend_reason", None)
              for sy in systems if sy not in baselines}
    return {"tasks": tasks, "seq_lens": seq_lens, "rows": rows, "agreement": checks,
            "load_rss_mb": load_mb, "isolated": s.isolate, "backend_choice": chosen, "precision_contracts": contracts,
            "comparisons": comparisons(rows), "mixing": mixing(rows)}


def _grouped_outputs(peft, w: Workload, rows: list[int]) -> list:
    out: list = [None] * len(rows)
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(rows):
        groups.setdefault(w.tasks[i], []).append(j)
    for task, js in groups.items():
        idx = [rows[j] for j in js]
        for j, o in zip(js, peft.run(w.ids[idx], w.mask[idx], [task] * len(idx), w.new_tokens)):
            out[j] = o
    return out


def _key(r: dict) -> tuple:
    return (r["batch_size"], r["seq_len"], r["mix"], r["task"])


def comparisons(rows: list[dict]) -> list[dict]:
    """promptmux / PEFT throughput for every configuration both ran (same run, same request stream): "speedup"
    against PEFT eager fp32, "speedup_vs_peft_bf16" against PEFT under bf16 autocast where that ran too."""
    peft = {_key(r): r for r in rows if r["system"] == "peft"}
    bf16 = {_key(r): r for r in rows if r["system"] == "peft-bf16"}
    out = []
    for r in rows:
        if r["system"] != "promptmux" or _key(r) not in peft and _key(r) not in bf16:
            continue
        c = {"backend": r["backend"], "precision": r.get("precision", "fp32"), "batch_size": r["batch_size"],
             "seq_len": r["seq_len"], "mix": r["mix"], "task": r["task"], "requests_per_s": r["requests_per_s"]}
        for key, base in (("", peft.get(_key(r))), ("_vs_peft_bf16", bf16.get(_key(r)))):
            if base is None:
                continue
            prefix = "peft_bf16_" if key else "peft_"
            c[f"{prefix}requests_per_s"] = base["requests_per_s"]
            c[f"speedup{key}"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
            c[f"latency_p50_ratio{key}"] = round(base["latency_ms"]["p50"] / r["latency_ms"]["p50"], 3)
        out.append(c)
    return out


def mixing(rows: list[dict]) -> list[dict]:
    """Mixed traffic against the same requests served as single-task traffic: the single-task runs' rates give
    the time each task's share would take alone (sum of n_t / rps_t); ratio = mixed rate / that rate."""
    single = {(r["backend"], r["batch_size"], r["seq_len"], r["task"]): r for r in rows if r["mix"] == "single"}
    out = []
    for r in rows:
        if r["mix"] == "single":
            continue
        shares = {t: v["requests"] for t, v in r["per_task"].items()}
        alone = [single.get((r["backend"], r["batch_size"], r["seq_len"], t)) for t in shares]
        if any(a is None for a in alone):
            continue
        n = sum(shares.values())
        expected = n / sum(shares[t] / a["requests_per_s"] for t, a in zip(shares, alone))
        out.append({"system": r["system"], "backend": r["backend"], "batch_size": r["batch_size"],
                    "seq_len": r["seq_len"], "mix": r["mix"], "requests_per_s": r["requests_per_s"],
                    "single_task_requests_per_s": round(expected, 3),
                    "ratio": round(r["requests_per_s"] / expected, 3)})
    return out


def deployment_info(rt) -> dict:
    return {"path": str(Path(rt.dir).resolve()), "model": generation.describe_config(rt.config),
            "family": rt.spec.family, "base": rt.manifest["base"].get("path"),
            "tasks": [{"name": t, "kind": rt.bank.view(t).kind, "virtual_tokens": rt.bank.view(t).num_virtual_tokens}
                      for t in rt.tasks]}


def run(s: BenchSettings) -> dict:
    """Everything the settings ask for; writes <out>.json, .md and the PNG plots. Returns the result."""
    import torch

    s.check()
    generation.quiet_libraries()
    if not s.threads:
        s.threads = os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    if not (Path(s.deploy) / "manifest.json").is_file():
        raise FileNotFoundError(f"{s.deploy} is not a promptmux deployment (no manifest.json); run promptmux export")
    from promptmux.runtime.runtime import Runtime

    # The parent's own Runtime: the deployment's tasks, bank and config, and the engine of --scaling / --accuracy
    # (the first backend and precision; otherwise the lightest, as the systems run in their own processes).
    engine = bool(s.scaling or s.accuracy or not s.isolate)
    first = system_pairs(s)[0]
    rt = Runtime(s.deploy, backend=first[0] if engine else "onnxruntime", precision=first[1] if engine else "fp32",
                 threads=s.threads, base=s.base)
    env = environment(s.threads, s.backends)
    started = time.perf_counter()
    result = {
        "benchmark": "promptmux bench",
        "command": s.command(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": env,
        "devices": sorted({device_of(b, env) for b in s.backends}),
        "settings": asdict(s),
        "deployment": deployment_info(rt),
        "definitions": {
            "request": "classification: one row classified; causal LM: one full-sequence forward (new_tokens 0) or "
                       "one generation of new_tokens tokens",
            "tokens_per_s": "real input tokens per second (new_tokens 0), generated tokens per second otherwise",
            "latency": "batch service time of the model call that answered the request (no queueing)",
            "requests_per_s": "median over rounds of requests / round wall time",
            "memory": memory_method() + "; with isolation (the default) each system is its own process and "
                      "peak_rss is that process's; with --same-process every system is loaded in one process, so "
                      "peak_rss includes the others' weights; rss_growth = peak during the round - RSS at its start (the allocator "
                      "and ONNX Runtime's arena keep memory, so only a round that needs more than before shows it); "
                      "load_rss_mb = RSS growth while a system loaded (safetensors weights are memory-mapped and "
                      "counted only once touched, so PEFT's load delta undercounts its weights)",
            "peft_batches": "PEFT eager: the same requests grouped by task, then batch_size at a time (one adapter "
                            "per batch)",
            "peft_bf16": "PEFT eager inside torch.autocast(bfloat16) (weights fp32, matrix products bf16)",
            "isolation": "each system in its own process, driven in alternating rounds (default), or all in this "
                         "process (--same-process)",
        },
    }
    if s.throughput:
        result["throughput"] = throughput(s, rt, env)
    if s.scaling:
        from .scaling import scaling

        result["scaling"] = scaling(s, rt)
    if s.accuracy:
        from .accuracy import accuracy

        result["accuracy"] = accuracy(s, rt)
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    from .report import write_outputs

    # No "targets" here: those are this project's own goals (python -m promptmux.bench.report --render adds them to
    # the recorded results), not a measure of a user's deployment.
    result["files"] = write_outputs(result, Path(s.out))
    return result


def run_from_args(args) -> dict:
    return run(settings_from_args(args))


def summary_table(result: dict) -> str:
    """What the CLI prints: the headline numbers as aligned text tables, and where the full result is."""
    blocks = []
    tp = result.get("throughput")
    if tp:
        config = ("backend", "batch_size", "seq_len", "mix", "task")
        comps = {tuple(c[k] for k in config): c for c in tp["comparisons"]}

        def ratio(r, key):
            c = comps.get(tuple(r[k] for k in config), {})
            return f"{c[key]:.2f}x" if key in c else ""

        rows = [[*(r[k] for k in config[:-1]), r["task"] or "all", f"{r['requests_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['latency_ms']['p50']:.1f}", ratio(r, "speedup"), ratio(r, "speedup_vs_peft_bf16")]
                for r in tp["rows"]]
        blocks.append(_table(["backend", "B", "S", "mix", "task", "req/s", "tok/s", "p50 ms", "vs PEFT",
                              "vs PEFT-bf16"], rows))
    if "scaling" in result:
        blocks.append(_table(["kind", "tasks", "vs tasks", "throughput ratio"],
                             [[r["kind"], r["to_tasks"], r["from_tasks"], f"{r['throughput_ratio']:.3f}"]
                              for r in result["scaling"]["ratios"]]))
    if "accuracy" in result:
        blocks.append(_table(["task", "examples", "promptmux", "PEFT eager", "differing"],
                             [[t, v["examples"], f"{v['accuracy_promptmux']:.4f}", f"{v['accuracy_peft']:.4f}",
                               v["differing_predictions"]] for t, v in result["accuracy"]["tasks"].items()]))
    files = result["files"]
    blocks.append(f"{'; '.join(result['devices'])}; {result['wall_seconds']} s. Full result: {files['json']} "
                  f"(and {files['markdown']}" + (", plots" if files["plots"] else "") + ")")
    return "\n\n".join(blocks)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


__all__ = ["BenchSettings", "Workload", "assign_tasks", "make_workload", "measure", "measure_jobs", "run", "run_from_args",
           "settings_from_args", "summary_table"]
