"""A completion's worker events read on the loop: collected into rows, or sent as server-sent events (SSE)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import StreamingResponse

from ..scheduler import GenerateJob
from .api_errors import ApiError, timed_out
from .metrics import Metrics

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the scheduler's finish reasons in OpenAI's words


class CancelOnClose(StreamingResponse):
    """A stream that cancels its request's work however it ends (finished, client gone, server stopping)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def job_events(job: GenerateJob, timeout: float):
    """The job's events as the worker sends them, until every row has finished."""
    left = len(job.prompts)
    deadline = time.monotonic() + timeout + 1.0  # the worker enforces the deadline; this guards the worker itself
    while left:
        try:
            events = await asyncio.wait_for(job.queue.get(), max(deadline - time.monotonic(), 0.01))
        except (TimeoutError, asyncio.TimeoutError):
            raise timed_out(timeout) from None
        for event in events:
            if event[0] == "error":  # this request's rows only: the others in the batch go on
                raise ApiError(500, "internal", None, "generation failed")
            if event[0] == "finish":
                left -= 1
                if event[2] == "timeout":
                    raise timed_out(timeout)
            yield event


async def collect(job: GenerateJob, timeout: float) -> list[dict]:
    """Each row's {"text", "tokens", "finish"} once every row has finished."""
    rows = [{"text": "", "tokens": 0, "finish": None} for _ in job.prompts]
    async for event in job_events(job, timeout):
        row = rows[event[1]]
        if event[0] == "token":
            row["text"] += event[2]
            row["tokens"] += event[3] is not None
        else:
            row["finish"] = event[2]
    return rows


async def sse(job: GenerateJob, cid: str, created: int, model: str, timeout: float, metrics: Metrics):
    """OpenAI's completion chunks, one per piece of text and one per finished row, then [DONE]."""
    def chunk(index, text, finish):
        return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [{"index": index, "text": text, "finish_reason": finish,
                                                   "logprobs": None}]}) + "\n\n"

    tokens = 0
    try:
        async for event in job_events(job, timeout):
            if event[0] == "token":
                tokens += event[3] is not None
                if event[2]:
                    yield chunk(event[1], event[2], None)
            else:
                yield chunk(event[1], "", FINISH[event[2]])
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the response has started: the error goes in the stream
        yield "data: " + json.dumps({"error": {"type": e.type, "field": e.field, "message": e.message}}) + "\n\n"
    finally:
        metrics.count_tokens(model, tokens)
