"""The model endpoints: /v1/classify (mixed-task batches) and /v1/completions (continuous batching, SSE)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..generate import SamplingParams
from ..scheduler import GenerateJob
from ..seq2seq_generate import decoder_too_long
from .api_errors import ERRORS, ApiError
from .metrics import Metrics
from .options import ServeOptions
from .replica import ClientGone, await_job, engine_of
from .schemas import (
    MAX_PROMPTS,
    MAX_STOPS,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
)
from .streaming import FINISH, CancelOnClose, collect, sse


def sampling_params(req: CompletionRequest) -> SamplingParams:
    """The request's sampling settings, with what the schema cannot check (stop strings, echo) refused here."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, "invalid_request", "stop", f"at most {MAX_STOPS} stop strings")
    for i, s in enumerate(stops):
        if not s or len(s) > 256:
            raise ApiError(400, "invalid_request", "stop" if isinstance(req.stop, str) else f"stop[{i}]",
                           "a stop string must have 1 to 256 characters")
    if req.echo:
        raise ApiError(400, "invalid_request", "echo", "echo is not supported")
    greedy = req.temperature == 0
    return SamplingParams(max_new_tokens=req.max_tokens, do_sample=not greedy,
                          temperature=1.0 if greedy else req.temperature, top_k=req.top_k, top_p=req.top_p,
                          seed=req.seed, stop=tuple(stops))


def inline_view(engine, body, options: ServeOptions):
    """The completion's task: a stored one, or for the served model name the request's own prompt (or none)."""
    if body.model != engine.served_name:
        if body.prompt_embeds is not None:
            raise ApiError(400, "invalid_request", "prompt_embeds",
                           f"prompt_embeds goes with model={engine.served_name!r} (the base model), not with a task")
        return engine.capture(body.model, "model")
    if body.prompt_embeds is not None and not options.allow_inline_prompts:
        raise ApiError(400, "invalid_request", "prompt_embeds", "per-request prompts are off on this server; start "
                                                                "it with --allow-inline-prompts")
    from .inline import inline_task

    return inline_task(engine.served_name, body.prompt_embeds, engine.rt.dims.prompt_width, engine.max_positions)


def completion_job(engine, body: CompletionRequest, options: ServeOptions) -> tuple[GenerateJob, list[list[int]]]:
    """A completion request checked, encoded and made a job (not yet admitted or queued), and its token ids."""
    if engine.family.generation is None:
        raise ApiError(400, "invalid_request", "model", "this deployment classifies: use /v1/classify")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise ApiError(400, "invalid_request", "prompt", f"give 1 to {MAX_PROMPTS} prompts")
    params = sampling_params(body)
    if engine.max_positions and body.max_tokens > engine.max_positions:
        raise ApiError(400, "invalid_request", "max_tokens",
                       f"max_tokens={body.max_tokens} exceeds the model's {engine.max_positions} positions")
    view = inline_view(engine, body, options)
    room = engine.family.new_token_room(body.max_tokens)  # a seq2seq prompt goes to the encoder
    if engine.family.encoder_decoder and (why := decoder_too_long(view, body.max_tokens, engine.max_positions,
                                                                  "max_tokens")):
        raise ApiError(400, "invalid_request", "max_tokens", why)
    ids, _ = engine.encode(prompts, view, "prompt", isinstance(body.prompt, str), room)
    job = GenerateJob(prompts=ids, view=view, params=params, tokenizer=engine.rt.tokenizer,
                      deadline=time.monotonic() + options.request_timeout, loop=asyncio.get_running_loop())
    return job, ids


def add_model_routes(app: FastAPI, options: ServeOptions, metrics: Metrics) -> None:
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="classify text(s) with one task; requests of all tasks share batches")
    async def classify(body: ClassifyRequest, request: Request):
        engine = engine_of(request)
        if not engine.family.classifies:
            raise ApiError(400, "invalid_request", "task", "this deployment generates text: use /v1/completions")
        if (body.text is None) == (body.texts is None):
            raise ApiError(400, "invalid_request", "text", "give exactly one of text or texts")
        view = engine.capture(body.task, "task")
        request.state.task = body.task
        single = body.text is not None
        ids, types = engine.encode([body.text] if single else body.texts, view, "text" if single else "texts",
                                   single)
        try:
            results = await engine.classify(ids, types, view, lambda future, cancel: await_job(
                request, future, cancel, options.request_timeout))
        except ClientGone:
            return Response(status_code=499)
        return {"task": body.task, "labels": view.labels, "results": results}

    @app.post("/v1/completions", response_model=CompletionResponse, responses={
        **ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "a completion, or with stream=true server-sent events"}},
              summary="OpenAI-compatible completions; model = task; continuous batching across tasks")
    async def completions(body: CompletionRequest, request: Request):
        engine = engine_of(request)
        job, ids = completion_job(engine, body, options)
        request.state.task = body.model
        release = engine.admit("generate")
        streaming = False
        try:
            engine.submit(job)
            cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if body.stream:
                streaming = True  # released when the stream ends

                def on_close():
                    engine.cancel(job)
                    release()
                return CancelOnClose(sse(job, cid, created, body.model, options.request_timeout, metrics),
                                     on_close=on_close, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
            rows = await await_job(request, asyncio.ensure_future(collect(job, options.request_timeout)),
                                   lambda: engine.cancel(job), options.request_timeout + 1)
        except ClientGone:
            return Response(status_code=499)
        except ApiError:
            engine.cancel(job)  # e.g. one of its rows failed: its other rows leave the batch
            raise
        finally:
            if not streaming:
                release()
        metrics.count_tokens(body.model, sum(r["tokens"] for r in rows))
        choices = [{"index": i, "text": r["text"], "finish_reason": FINISH[r["finish"]], "logprobs": None}
                   for i, r in enumerate(rows)]
        prompt_tokens = sum(len(x) for x in ids)
        completion_tokens = sum(r["tokens"] for r in rows)
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
