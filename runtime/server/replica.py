"""The engine of one server process / replica: the Runtime and its scheduler, request checks, admission, jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import Request

from promptmux.core.bank import UnknownTaskError

from ..scheduler import ClassifyJob, JobTimeout, Overloaded, Scheduler
from ..text import load_tokenizer, too_long
from .api_errors import ApiError, overloaded, timed_out
from .metrics import Metrics
from .options import ServeOptions

log = logging.getLogger("promptmux.serve")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (the response is 499, which nobody reads)."""


class Engine:
    def __init__(self, deploy_dir: str | Path, options: ServeOptions, metrics: Metrics):
        from ..precision import calibration_texts
        from ..runtime import Runtime

        self.options = options
        texts = calibration_texts(options.calibration) if options.calibration else None
        self.rt = Runtime(deploy_dir, backend=options.backend, threads=options.threads, precision=options.precision,
                          strict=options.strict, calibration=texts, bank_cache_mb=options.bank_cache_mb,
                          kv_cache_mb=options.kv_cache_mb)
        try:  # the loop thread's own tokenizer (encoding); the worker decodes with the runtime's
            self.tok = load_tokenizer(self.rt.dir)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{deploy_dir} has no tokenizer ({e}); the server takes text") from None
        # Every engine and graph the routing can pick, built and run once now: no request pays for a build. The
        # steps go to the server's log (it shows warnings and above): start-up takes seconds, and this says why.
        self.rt.prepare(progress=lambda line: log.warning("%s", line))
        self.family = self.rt.spec.family
        self.max_positions = self.rt.max_positions  # the positions a row may use
        # The base model's own name (completions with their own soft prompt, or none); no task may have it.
        self.served_name = options.served_model_name or Path(deploy_dir).resolve().name
        if self.served_name in self.rt.bank:
            raise RuntimeError(f"a task is named {self.served_name!r}, the served model name; pass "
                               "--served-model-name with another name")
        # More than 32 characters per token is beyond the tokenizers we know: longer texts are refused before
        # any time goes into tokenizing them.
        self.max_chars = 32 * (self.max_positions or 4096)
        self.applied = 0  # changes of a shared task log applied (admin.sync_tasks)
        self.waiting: dict = {}  # task-log change id -> its outcome, for the requests of this replica that made them
        self.inflight = 0  # model requests admitted and not answered yet (loop thread only)
        self.sync_lock = asyncio.Lock()
        self.scheduler = Scheduler(self.rt, options.max_batch, options.max_wait_ms, options.max_queue, metrics)
        metrics.bind(self.scheduler)
        self.scheduler.start()

    def capture(self, task: str, field: str):
        """The task's view from one read of the bank: the request keeps it, whatever happens to the bank."""
        bank = self.rt.bank
        try:
            return bank.view(task)
        except UnknownTaskError as e:  # the bank's own words: a few tasks named, a million counted
            raise ApiError(404, "unknown_task", field, str(e)) from None

    def check_texts(self, texts: list[str], field: str, single: bool) -> None:
        for i, t in enumerate(texts):
            name = field if single else f"{field}[{i}]"
            if not t.strip():
                raise ApiError(400, "invalid_request", name, "empty text: give something to read")
            if len(t) > self.max_chars:
                raise ApiError(400, "invalid_request", name, f"text over {self.max_chars} characters")

    def encode(self, texts: list[str], view, field: str, single: bool, room: int = 0):
        """Token ids per text. Texts that do not fit the model's positions with the task's virtual tokens are
        refused (field: the text), and so are `room` new tokens that do not fit after them (field: max_tokens),
        instead of being truncated."""
        self.check_texts(texts, field, single)
        enc = self.tok(list(texts))
        ids = enc["input_ids"]
        limit = self.max_positions
        for i, row in enumerate(ids):
            if not row:
                raise ApiError(400, "invalid_request", field if single else f"{field}[{i}]",
                               "the text gives no tokens with this deployment's tokenizer; send text it can read")
            refused = too_long(len(row), view.num_virtual_tokens, view.name, limit)
            if refused:
                raise ApiError(400, "invalid_request", field if single else f"{field}[{i}]", refused)
            refused = too_long(len(row), view.num_virtual_tokens, view.name, limit, room, "max_tokens")
            if room and refused:
                raise ApiError(400, "invalid_request", "max_tokens", refused)
        return ids, enc.get("token_type_ids")

    def admit(self, queue: str):
        """The admission rule: a model request is admitted while fewer than max_inflight are being served and
        the oldest request waiting in its queue ("classify" or "generate") has waited under max_queue_wait; otherwise it gets 503 +
        Retry-After at once, instead of a latency that grows with the crowd. Returns the release to call when
        the response ends (idempotent)."""
        limit = self.options.max_inflight or 4 * self.options.max_batch
        if self.inflight >= limit:
            raise overloaded(f"{self.inflight} requests in flight; retry later")
        waited = self.scheduler.oldest_wait(queue)
        if waited > self.options.max_queue_wait:
            raise overloaded(f"the oldest queued request has waited {waited:.1f} s; retry later")
        self.inflight += 1
        released = []

        def release():
            if not released:
                released.append(True)
                self.inflight -= 1
        return release

    def submit(self, job) -> None:
        """Queue a ClassifyJob or GenerateJob with the scheduler; a full queue is 503."""
        sched = self.scheduler
        classify = isinstance(job, ClassifyJob)
        submit = sched.submit_classify if classify else sched.submit_generate
        rows = len(job.ids) if classify else len(job.prompts)
        if rows > sched.max_queue:  # would be refused however long the client waited: not a 503
            what = "texts" if classify else "prompts"
            raise ApiError(400, "invalid_request", None, f"{rows} {what} in one request, more than this server "
                                                         f"queues at once (--max-queue {sched.max_queue}); send at "
                                                         f"most {sched.max_queue} per request")
        try:
            submit(job)
        except Overloaded as e:
            raise overloaded(f"{e}; retry later") from None

    async def classify(self, ids: list[list[int]], types, view, wait) -> list[dict]:
        """Admit, queue and await one classification request of any protocol: one label_scores dict per row.
        wait(future, cancel): awaits the job's future (cancel() drops its work: client gone, deadline)."""
        loop = asyncio.get_running_loop()
        job = ClassifyJob(ids=ids, types=types, view=view, deadline=time.monotonic() + self.options.request_timeout,
                          loop=loop, future=loop.create_future())
        release = self.admit("classify")
        try:
            self.submit(job)
            return await wait(job.future, lambda: self.cancel(job))
        except JobTimeout as e:
            raise ApiError(504, "timeout", None, str(e)) from None
        finally:
            release()

    def cancel(self, job) -> None:
        """Drop a job's work (its rows leave the batch at the worker's next step)."""
        if not job.cancelled:
            job.cancelled = True
            self.scheduler.wake()

    def stop(self) -> None:
        self.scheduler.stop()


def task_page(bank, page) -> tuple[list[str], bool]:
    """One page of the bank's task names (a listing never returns a million names at once)."""
    try:
        return bank.listing(page.limit, page.after)
    except UnknownTaskError as e:
        raise ApiError(400, "invalid_request", "after", str(e)) from None


def engine_of(request: Request) -> Engine:
    """The app's engine, or 503 while it loads or drains."""
    return engine_ready(request.app)


def engine_ready(app) -> Engine:
    """The app's engine, or 503 while it loads or drains (any protocol)."""
    engine = getattr(app.state, "engine", None)
    if engine is None or app.state.draining or not engine.scheduler.alive:
        raise overloaded("the server is starting or shutting down")
    return engine


async def await_job(request: Request, work: asyncio.Future, on_cancel, timeout: float):
    """The result of work, unless the client disconnects (its work is cancelled) or the timeout passes."""
    watch = asyncio.ensure_future(request.receive())  # the body is read: the next message is the disconnect
    try:
        deadline = time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({work, watch}, timeout=max(deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            if watch in done:
                if watch.result().get("type") == "http.disconnect":
                    on_cancel()
                    raise ClientGone()
                watch = asyncio.ensure_future(request.receive())
                continue
            on_cancel()
            raise timed_out(timeout)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
