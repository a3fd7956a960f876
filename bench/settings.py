"""What `promptmux bench` is asked to measure: the settings, their checks, the command line that reproduces them,
and what follows from them alone (the promptmux systems to build, where the PEFT baselines run)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .prompt_kinds import SCALING_KINDS

MIXES = ("single", "uniform", "zipf")
BACKENDS = ("auto", "onnxruntime", "openvino", "onnxruntime+openvino", "onnxruntime-cuda", "tensorrt",
            "torch")
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")
PRECISIONS = ("fp32", "bf16", "int8", "fast")  # fast: what Runtime(precision="fast") chose on this CPU
BASELINES = ("peft", "peft-bf16", "peft-int8")  # PEFT eager fp32, under torch.autocast(bfloat16), in PyTorch's int8


@dataclass
class BenchSettings:
    deploy: str
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    tasks: list[str] | None = None  # None: every task of the deployment
    mixes: list[str] = field(default_factory=lambda: ["single", "uniform"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] | None = None  # None: the family's bench_seq_len (core/families)
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
    scaling_kinds: list[str] = field(default_factory=lambda: list(SCALING_KINDS))
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
            if not self.isolate:
                a += ["--same-process"]
            if "zipf" in self.mixes and self.zipf_s != 1.0:
                a += ["--zipf-s", f"{self.zipf_s:g}"]
        else:
            a += ["--skip-throughput"]
        if self.baselines and (self.throughput or self.accuracy):  # the accuracy pass reads peft-bf16 / peft-int8
            a += ["--baseline", ",".join(self.baselines)]
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
