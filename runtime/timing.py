"""Timing runtime configurations against each other, each in a process of its own.

Two engines' thread pools in one process distort each other's times (bench/isolated.py says how much). The choices
promptmux makes by timing were made in one process: on a 2-core AMX Xeon the routing sent 1 x 64 to OpenVINO where
ONNX Runtime was 5-10 % faster (timed apart and in the benchmark: results/routing-isolated-minilm-intel-amx.md), and
OpenVINO's bf16 took 3.9 ms at 1 x 64 right after ONNX Runtime's calls, 3.1 ms alone. So fast.py and routing.py time
here: each configuration (Runtime keyword arguments) opened in a process of its own (timing_worker.py), the processes
driven in turn from this one: in each round a process idles SETTLE_S (the previous one's threads stop spinning), then
runs each shape as one untimed call and BLOCK timed ones; the order of the processes is reversed every other round,
and each shape's time is the median of the rounds.
"""

from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable

# (rows, tokens) of a classifier's timing batches: the sizes the benchmarks use (routing.py times each engine on
# them; fast.py scores each precision over them, since which precision wins changes with the length).
CLASSIFIER_SHAPES = ((1, 64), (8, 64), (16, 64), (32, 64), (8, 256))
# A language model's: (prompts, prompt tokens, new tokens) of one generation.
GENERATION_SHAPES = ((4, 16, 16),)
ROUNDS = 5
BLOCK = 3
SETTLE_S = 0.05  # idle before a turn: without it 1 x 64 on OpenVINO timed 3.9 ms after ONNX Runtime, 3.1 alone
START_TIMEOUT_S = 1800  # opening a configuration may convert a graph for OpenVINO first


def workload(rt, shape: tuple[int, ...]):
    """(a callable running one batch of `shape` on rt, its real tokens per row): rows x tokens through forward() for
    a classifier, a generation for a language model; tokens cut to the model's positions."""
    task = rt.bank.page(1)[0][0]  # the first task (rt.tasks reads every name)
    rows, tokens, new = (*shape, 0)[:3]
    if rt.max_positions:
        tokens = max(1, min(tokens, rt.max_positions - rt.bank.view(task).num_virtual_tokens - new))
    vocab = rt.dims.vocab_size
    ids = np.random.default_rng(0).integers(min(1000, vocab // 2), vocab, size=(rows, tokens))
    mask = np.ones_like(ids)
    if not new:
        return (lambda: rt.forward(ids, mask, task)), tokens
    return (lambda: rt.generate({"input_ids": ids, "attention_mask": mask}, task, max_new_tokens=new,
                                eos_token_id=[])), tokens


class _Child:
    """A configuration opened by `python -m promptmux.runtime.timing_worker`, spoken to in JSON lines. A process
    started with its own command, not multiprocessing's spawn: that runs the caller's main script again in the child
    (a script without a __main__ guard, or one read from stdin, would open the runtime again or fail)."""

    def __init__(self, name: str, deploy_dir: Path, kwargs: dict, shapes: list):
        self.name = name
        self.process = subprocess.Popen([sys.executable, "-m", "promptmux.runtime.timing_worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.send({"deploy": str(deploy_dir), "kwargs": kwargs, "shapes": shapes})

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float | None = None):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"timing {self.name}: the process did not answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"timing {self.name}: the process exited with status {self.process.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            kind, message, trace = answer["error"]
            if kind == BackendUnavailable.__name__:
                raise BackendUnavailable(message)
            raise RuntimeError(f"timing {self.name}: {kind}: {message}\n{trace}")
        return answer["ok"]

    def close(self) -> None:
        try:
            self.process.stdin.close()  # the worker exits at the end of its input
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


def time_apart(deploy_dir: str | Path, configs: dict[str, dict], shapes, rounds: int = ROUNDS) -> dict:
    """{name: {"seconds": [median seconds per shape], "rounds": [[seconds in each round] per shape], "tokens": [real
    tokens per row per shape], "positions": [rows x width per shape, routed runtimes only], "graph_runs": {graph file:
    batches it ran}}} for each configuration (name -> Runtime keyword arguments, plus "force": an engine a routed
    runtime keeps to, and "deploy": another deployment than deploy_dir), each opened in a process of its own. Round
    r of one configuration and round r of another ran next to each other: compare them pairwise to see past the
    machine's drift between rounds."""
    shapes = [list(s) for s in shapes]
    children = [_Child(name, Path(kwargs.get("deploy", deploy_dir)),
                       {k: v for k, v in kwargs.items() if k != "deploy"}, shapes) for name, kwargs in configs.items()]
    try:
        tokens = {c.name: c.reply(timeout=START_TIMEOUT_S) for c in children}
        times = {c.name: [[] for _ in shapes] for c in children}
        positions = {c.name: [0] * len(shapes) for c in children}
        graph_runs = {c.name: {} for c in children}
        for r in range(rounds):
            for child in children if r % 2 == 0 else children[::-1]:
                child.send({"time": True})
                per_shape, graph_runs[child.name] = child.reply()
                for i, (seconds, positions[child.name][i]) in enumerate(per_shape):
                    times[child.name][i].append(seconds)
    finally:
        for child in children:
            child.close()
    return {name: {"seconds": [statistics.median(ts) for ts in times[name]], "rounds": times[name],
                   "tokens": tokens[name], "positions": positions[name], "graph_runs": graph_runs[name]}
            for name in times}
