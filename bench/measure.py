"""Measurement primitives: peak memory (RSS sampling), latency percentiles, warm-up, interleaved rounds of
several systems (measure_jobs), their summary, the load average and the progress bar."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .workload import Workload

SETTLE_S = 0.1  # idle between two systems' rounds, so one system's spinning worker threads do not slow the next


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (other processes using the CPU show here)."""
    return [round(x, 2) for x in os.getloadavg()]


def progress(total: int, quiet: bool, desc: str = "bench"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="round", disable=quiet, leave=False)


# ---- memory --------------------------------------------------------------------------------

MEMORY_METHOD_PSUTIL = "psutil RSS of this process, sampled every 5 ms"
MEMORY_METHOD_RUSAGE = "resource.getrusage ru_maxrss (lifetime peak RSS of this process), deltas"


def rss(pid: int | None = None) -> int:
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
        self.start = self.peak = rss(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))
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
class Runs:
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


def _one_pass(system, w: Workload, batches: list[list[int]], runs: Runs, task_req: dict, task_tok: dict) -> int:
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
    """Each distinct batch shape (size, and the task of a single-task batch) SPECIALIZE_AFTER times, then the
    system's shape-specialised OpenVINO models (runtime/openvino_session.py) are awaited: the rounds time the
    steady state, and graph_runs says which model ran."""
    from promptmux.runtime.openvino_session import SPECIALIZE_AFTER

    seen = set()
    for rows in w.batches(system.grouped):
        tasks = {w.tasks[i] for i in rows}
        key = (len(rows), next(iter(tasks)) if len(tasks) == 1 else "mixed")
        if key not in seen:
            seen.add(key)
            for _ in range(1 if w.new_tokens else SPECIALIZE_AFTER):  # generation: decoder steps never specialise
                system.run(w.ids[rows], w.mask[rows], [w.tasks[i] for i in rows], w.new_tokens)
    if hasattr(system, "settle"):
        system.settle()


def measure_jobs(jobs: list[tuple], repeats: int, duration: float | None, bar=None) -> list[Runs]:
    """jobs: (system, workload) pairs. Round r runs every job once, in order (reversed every other round), so that
    load from other processes hits every system and every traffic mix alike."""
    runs = [Runs() for _ in jobs]
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


def measure(systems: list, w: Workload, repeats: int, duration: float | None, bar=None) -> dict[str, Runs]:
    """Interleaved rounds of every system on the same workload."""
    return {sy.name: r for sy, r in zip(systems, measure_jobs([(sy, w) for sy in systems], repeats, duration, bar))}


def summarize(r: Runs) -> dict:
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
