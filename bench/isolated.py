"""A benchmarked system in a process of its own.

Two engines' thread pools in one process spin against each other: on a 2-core machine the same ONNX Runtime
session timed twice in one process measured 2.9x and then 1.6x PEFT, and 1.1x both times in separate
processes. So by default `promptmux bench` builds every system (each promptmux backend and precision, each PEFT
baseline) in its own child process and drives them in alternating rounds from the parent. The child times its
own model calls, so the pipe between the processes costs nothing measured.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass

START_TIMEOUT_S = 1800  # building a system may export, convert or calibrate first


@dataclass(frozen=True)
class SystemSpec:
    """What to build: system "promptmux" (backend, precision) or "peft" (precision fp32, bf16 autocast or int8)."""

    system: str
    deploy: str
    threads: int
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"  # PEFT's device ("cuda" when the promptmux systems run on a GPU)
    tasks: tuple[str, ...] = ()
    base: str | None = None
    adapters: tuple[tuple[str, str], ...] = ()


def build(spec: SystemSpec, meta=None):
    """The system itself (in whatever process calls this). meta: a Runtime of the deployment for PEFT's task
    metadata, if the caller has one."""
    import torch

    from promptmux.runtime.runtime import Runtime

    from .baseline import PeftSystem, PromptmuxSystem

    torch.set_num_threads(spec.threads)
    if spec.system == "promptmux":
        return PromptmuxSystem(Runtime(spec.deploy, backend=spec.backend, precision=spec.precision,
                                       threads=spec.threads, base=spec.base))
    meta = meta or Runtime(spec.deploy, backend="onnxruntime", threads=1)  # metadata only: bank, config, family
    return PeftSystem(meta, list(spec.tasks), spec.base, dict(spec.adapters), device=spec.device,
                      precision=spec.precision)


def _child(conn, spec: SystemSpec) -> None:
    from promptmux.core.quiet import quiet_libraries

    from .measure import rss

    quiet_libraries(all_warnings=True)
    try:
        before = rss()
        system = build(spec)
        rt = getattr(system, "rt", None)
        if rt is not None:  # the contract's calibration batches at open are no benchmark batches
            rt.graph_runs.clear()
        conn.send(("ready", {"name": system.name, "backend": system.backend, "grouped": system.grouped,
                             "precision": getattr(system, "precision", "fp32"),
                             "forward_precision": getattr(system, "forward_precision", None),
                             "backend_reason": getattr(rt, "backend_reason", None),
                             "contract": getattr(rt, "contract", None), "fast": getattr(rt, "fast", None),
                             "load_rss_mb": round((rss() - before) / 2**20, 1)}))
    except BaseException as e:  # the parent re-raises it with the child's message
        conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
        return
    while True:
        op, *args = conn.recv()
        try:
            if op == "close":
                return
            if op == "prepare":
                conn.send(("ok", system.prepare(*args)))
            elif op == "run":
                conn.send(("ok", system.run(*args)))
            elif op == "settle":  # the shape-specialised OpenVINO models the warm-up started, compiled
                conn.send(("ok", system.settle() if hasattr(system, "settle") else None))
            elif op == "graph_runs":  # full-sequence batches per graph file that ran (Runtime.graph_runs)
                conn.send(("ok", dict(getattr(rt, "graph_runs", None) or {})))
            elif op == "timed":
                t = time.perf_counter()
                system.run(*args)
                conn.send(("ok", time.perf_counter() - t))
        except BaseException as e:
            conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))


def _user_errors() -> dict:
    from promptmux.runtime.errors import BackendUnavailable, InputError
    from promptmux.runtime.precision import PrecisionError

    return {e.__name__: e for e in (BackendUnavailable, InputError, PrecisionError, FileNotFoundError, ValueError)}


class IsolatedSystem:
    """The same interface as PromptmuxSystem / PeftSystem (name, backend, grouped, prepare, run) plus timed()
    and the child's pid (for memory sampling)."""

    def __init__(self, spec: SystemSpec):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no thread pool inherited from the parent
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child, spec), daemon=True)
        self.process.start()
        child.close()
        self.pid = self.process.pid
        info = self._reply(timeout=START_TIMEOUT_S)
        self.name, self.backend, self.grouped = info["name"], info["backend"], info["grouped"]
        self.precision, self.backend_reason = info["precision"], info["backend_reason"]
        self.forward_precision = info["forward_precision"] or self.precision
        self.contract, self.load_rss_mb, self.fast = info["contract"], info["load_rss_mb"], info["fast"]

    def _reply(self, timeout: float | None = None):
        if timeout is not None and not self._conn.poll(timeout):
            self.close()
            raise TimeoutError(f"a benchmark worker did not answer within {timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"a benchmark worker (pid {self.pid}) exited with status "
                               f"{self.process.exitcode}") from None
        if status == "error":
            name, message, trace = value
            user_error = _user_errors().get(name)
            if user_error is not None:  # what the user can fix: the same error and message as in-process
                raise user_error(message)
            raise RuntimeError(f"in a benchmark worker: {name}: {message}\n{trace}")
        return value

    def _call(self, *msg):
        self._conn.send(msg)
        return self._reply()

    def prepare(self, new_tokens: int) -> None:
        self._call("prepare", new_tokens)

    def run(self, ids, mask, tasks, new_tokens):
        return self._call("run", ids, mask, tasks, new_tokens)

    def graph_runs(self) -> dict:
        return self._call("graph_runs")

    def settle(self) -> None:
        self._call("settle")

    def timed(self, ids, mask, tasks, new_tokens) -> float:
        """Seconds the model call took, measured in the worker."""
        return self._call("timed", ids, mask, tasks, new_tokens)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
