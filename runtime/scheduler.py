"""The serving scheduler: one worker thread runs every model call, the asyncio loop only routes.

- Classification: requests of any tasks queue up; the worker packs them into one mixed-task batch when
  it holds max_batch texts or the oldest has waited max_wait_ms.
- Generation: continuous batching (runtime/generate.py ContinuousBatch); rows join and leave the running
  batch at every decoding step, each with its own task, length, sampling and stop condition.

Requests capture their task's Task when they are admitted, so a bank swap (task added or removed)
never tears a request, and a removed task's admitted requests still finish. The queue is bounded:
submit() raises Overloaded instead of letting it grow. Results go back to the loop with
call_soon_threadsafe; a cancelled request (client gone, timeout) is skipped or dropped from the batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.archs import pad_id
from promptmux.core.task import Task

from .batch import label_scores, run_batch
from .generate import (
    ContinuousBatch,
    SamplingParams,
    StreamedRows,
    TextStream,
)

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.serve")
# How generation requests share steps, by Family.generation: a causal LM's rows join and leave one running batch;
# a seq2seq model's rows stream one by one.
BATCHES = {"causal": ContinuousBatch, "seq2seq": StreamedRows}


class Overloaded(Exception):
    """The queue is full (or the server is draining): answer 503 with Retry-After."""


class JobTimeout(Exception):
    """The request ran past its deadline."""


@dataclass(eq=False)
class ClassifyJob:
    ids: list[list[int]]  # one token list per text, no padding
    types: list[list[int]] | None
    view: Task
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def set_():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)
        self.loop.call_soon_threadsafe(set_)


@dataclass(eq=False)
class GenerateJob:
    """One completion request: one or more prompts (rows) of one task. Events for the loop:
    ("token", index, text, token_id) and ("finish", index, reason)."""

    prompts: list[list[int]]
    view: Task
    params: SamplingParams
    tokenizer: object
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    finished: int = 0
    enqueued: float = field(default_factory=time.monotonic)

    def deliver(self, events: list) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)


class Scheduler:
    def __init__(self, rt: Runtime, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024, metrics=None):
        self.rt = rt
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._cls: collections.deque[ClassifyJob] = collections.deque()
        self._cls_rows = 0
        self._gen: collections.deque[tuple[GenerateJob, int]] = collections.deque()  # rows waiting to join
        self._stop = False
        self._thread: threading.Thread | None = None
        self.positions = rt.max_positions  # the positions a row may use
        self.batch = None
        if rt.spec.family.generation is not None:
            gen = rt.generator  # builds the decoder session and each task's prompt KV now, not at the first request
            self.batch = BATCHES[rt.spec.family.generation](gen)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="promptmux-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def depth(self, queue: str) -> int:
        """Requests waiting in a queue: "classify" (rows) or "generate"."""
        return self._cls_rows if queue == "classify" else len(self._gen)

    def oldest_wait(self, queue: str) -> float:
        """Seconds the oldest request still waiting in this queue ("classify" or "generate") has waited (0: none
        waits)."""
        with self._cv:
            if queue == "classify":
                head = next((j for j in self._cls if not j.cancelled), None)
            else:
                head = next((j for j, _ in self._gen if not j.cancelled), None)
            return time.monotonic() - head.enqueued if head is not None else 0.0

    def running(self) -> int:
        return len(self.batch) if self.batch is not None else 0

    # ---- submission (loop thread) ---------------------------------------------------------
    def submit_classify(self, job: ClassifyJob) -> None:
        with self._cv:
            if self._stop:
                raise Overloaded("the server is shutting down")
            if self._cls_rows + len(job.ids) > self.max_queue:
                raise Overloaded(f"the classification queue is full ({self._cls_rows} texts waiting)")
            self._cls.append(job)
            self._cls_rows += len(job.ids)
            self._cv.notify()

    def submit_generate(self, job: GenerateJob) -> None:
        with self._cv:
            if self._stop:
                raise Overloaded("the server is shutting down")
            if len(self._gen) + len(job.prompts) > self.max_queue:
                raise Overloaded(f"the generation queue is full ({len(self._gen)} prompts waiting)")
            self._gen.extend((job, i) for i in range(len(job.prompts)))
            self._cv.notify()

    def wake(self) -> None:
        """A job was cancelled: let the worker drop it now rather than at its next step."""
        with self._cv:
            self._cv.notify()

    # ---- worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._cls or self._gen or (self.batch is not None and len(self.batch))):
                    self._cv.wait()
                if self._stop:
                    break
                jobs = self._take_classify()
            if jobs:
                self._safely(self._classify, jobs)
            if self.batch is not None and (self._gen or len(self.batch)):
                self._safely(self._generate_step)
        self._fail_all(Overloaded("the server stopped"))

    def _safely(self, fn, jobs: list[ClassifyJob] | None = None) -> None:
        try:
            fn(jobs) if jobs is not None else fn()
        except Exception as e:  # a bug, not a request error: fail what was in flight, keep serving
            if jobs is None:
                log.exception("worker error")
                self._fail_batch(e)
            elif len(jobs) == 1:
                log.exception("worker error")
                jobs[0].resolve(error=e)
            else:  # no request fails another: each job of the batch runs again alone, only the culprit fails
                log.warning("a batch of %d requests failed (%r); each runs again alone", len(jobs), e)
                for job in jobs:
                    self._safely(fn, [job])

    def _take_classify(self) -> list[ClassifyJob]:
        """Under the lock: the next classification batch, or [] to wait (the oldest request may wait max_wait
        for others to fill the batch, unless generation steps are due)."""
        while self._cls and self._cls[0].cancelled:
            self._cls_rows -= len(self._cls.popleft().ids)
        if not self._cls:
            return []
        waited = time.monotonic() - self._cls[0].enqueued
        busy = self.batch is not None and (self._gen or len(self.batch))
        if self._cls_rows < self.max_batch and waited < self.max_wait and not busy:
            self._cv.wait(self.max_wait - waited)
            return []
        jobs, rows, width, virtual = [], 0, 0, 0
        while self._cls:
            job = self._cls.popleft()
            self._cls_rows -= len(job.ids)
            if job.cancelled:
                continue
            w = max(width, max(len(r) for r in job.ids))
            v = max(virtual, job.view.num_virtual_tokens)
            # Rows are padded to the batch's longest and every row's positions run through its own virtual
            # tokens and that width: a job that would push a row past the model's positions waits for the next
            # batch (each job fits alone: the server checked it).
            if jobs and (rows + len(job.ids) > self.max_batch or (self.positions and w + v > self.positions)):
                self._cls.appendleft(job)
                self._cls_rows += len(job.ids)
                break
            jobs.append(job)
            rows, width, virtual = rows + len(job.ids), w, v
        return jobs

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        now = time.monotonic()
        for job in [j for j in jobs if now > j.deadline]:
            job.resolve(error=JobTimeout("the request waited past its timeout"))
        jobs = [j for j in jobs if now <= j.deadline]
        if not jobs:
            return
        rt = self.rt
        views = [j.view for j in jobs for _ in j.ids]
        rows = [r for j in jobs for r in j.ids]
        width = max(len(r) for r in rows)
        pad = pad_id(rt.config)
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):  # right padding, as the tokenizer pads a classification batch
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        types = None
        if any(j.types is not None for j in jobs):  # rows without (v2 input_ids) have segment 0, as alone
            types = np.zeros_like(ids)
            rows_types = (t for j in jobs for t in (j.types if j.types is not None else [()] * len(j.ids)))
            for i, r in enumerate(rows_types):
                types[i, :len(r)] = r
        # No bank_key: a batch may hold views of different bank versions, so device sessions must not serve
        # it from prompts they keep resident per (version, tasks).
        logits = run_batch(rt, ids, mask, types, views, bank_key=None)
        if self.metrics is not None:
            self.metrics.observe_batch("classify", [v.name for v in views])
        start = 0
        for job in jobs:
            n = len(job.ids)
            results = [label_scores(job.view, row) for row in logits[start:start + n]]
            start += n
            job.resolve(results)

    def _generate_step(self) -> None:
        batch = self.batch
        now = time.monotonic()
        # Rows join the running batch while there is room (their prompts prefilled together).
        joining = []
        while len(batch) + len(joining) < self.max_batch:
            with self._cv:
                if not self._gen:
                    break
                job, index = self._gen.popleft()
            if job.cancelled:
                continue
            if now > job.deadline:
                job.deliver([("finish", index, "timeout")])
                continue
            joining.append((job.prompts[index], job.view, job.params, True,
                            (job, index, TextStream(job.tokenizer, job.params.stop))))
        self._join(joining)
        for row in batch.rows:  # rows of cancelled or expired requests leave before their next token
            job = row.tag[0]
            if job.cancelled:
                row.finish("cancelled")
            elif now > job.deadline:
                row.finish("timeout")
        # Rows that finish for any reason other than pick() still tell their request.
        gone = [row for row in batch.rows if row.finish_reason is not None]
        picked = batch.pick()
        if self.metrics is not None and picked:
            self.metrics.observe_batch("generate", [row.view.name for row, _ in picked])
        events: dict[int, tuple[GenerateJob, list]] = {}
        for row, token in picked:
            job, index, text = row.tag
            out = events.setdefault(id(job), (job, []))[1]
            try:  # detokenizing and stop strings are per row: a failure ends this row only
                piece = text.add(token)
                if text.stopped:  # a stop string wins over EOS and length on the same token (as in generate())
                    row.finish_reason = "stop"
                tail = text.flush() if row.finish_reason is not None else ""
            except Exception as e:
                row.fail(e)
                continue
            out.append(("token", index, piece, token))
            if row.finish_reason is not None:
                if tail:
                    out.append(("token", index, tail, None))
                out.append(("finish", index, row.finish_reason))
        for row in gone:
            job, index, _ = row.tag
            events.setdefault(id(job), (job, []))[1].append(("finish", index, row.finish_reason))
        for row in batch.rows:
            if row.error is not None:
                log.error("generation row failed: %r", row.error)
                job, index, _ = row.tag
                events.setdefault(id(job), (job, []))[1].append(("error", index, str(row.error)))
        for job, out in events.values():
            job.deliver(out)
        batch.advance()

    def _join(self, joining: list) -> None:
        """Prefill the joining rows into the running batch. If their shared prefill fails, each row is tried
        alone: only the rows that fail by themselves get the error, at once (none waits out its timeout)."""
        if not joining:
            return
        try:
            self.batch.add_many(joining)
            return
        except Exception as e:
            if len(joining) == 1:
                log.error("a row could not join the batch: %r", e)
                job, index, _ = joining[0][4]
                job.deliver([("error", index, str(e))])
                return
        for item in joining:
            self._join([item])

    def _fail_batch(self, error: Exception) -> None:
        """After a worker error in generation: every running row's request ends with that error."""
        batch, self.batch = self.batch, None
        for row in batch.rows:
            row.tag[0].deliver([("error", row.tag[1], str(error))])
        self.batch = type(batch)(batch.gen)

    def _fail_all(self, error: Exception) -> None:
        with self._cv:
            cls, gen = list(self._cls), list(self._gen)
            self._cls.clear()
            self._gen.clear()
            self._cls_rows = 0
        for job in cls:
            job.resolve(error=error)
        for job, index in gen:
            job.deliver([("error", index, str(error))])
        if self.batch is not None:
            for row in self.batch.rows:
                row.tag[0].deliver([("error", row.tag[1], str(error))])
