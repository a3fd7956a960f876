"""KServe v2 over HTTP: health, metadata, infer (JSON and Triton's binary tensors) and Triton's generate extension,
on the app's engine and scheduler (kserve.py says what a model takes and gives)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .api_errors import ApiError
from .inference import completion_job
from .kserve import (
    OUTPUT_TYPES,
    check_model,
    check_version,
    infer,
    metric_task,
    model_metadata,
    requested_outputs,
    server_metadata,
)
from .kserve_tensors import HEADER, bad, parse_request, response_body
from .metrics import Metrics
from .options import ServeOptions
from .replica import ClientGone, await_job, engine_of
from .schemas import CompletionRequest
from .streaming import CancelOnClose, collect, job_events

POST_ONLY = ("/infer", "/generate", "/generate_stream")
GENERATE_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def add_kserve_routes(app: FastAPI, options: ServeOptions, metrics: Metrics) -> None:
    @app.get("/v2", summary="KServe v2: server metadata")
    async def v2_server():
        return server_metadata()

    @app.get("/v2/health/live", summary="KServe v2: liveness")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="KServe v2: readiness (the engine loaded, not draining)")
    async def v2_ready(request: Request):
        engine_of(request)
        return {"ready": True}

    # The unversioned route is the outer decorator, so registered last: decorators apply from the bottom, and
    # {task:path} would otherwise take "pt/versions/1" for a task's name (the versioned routes answered 404).
    @app.get("/v2/models/{task:path}/ready", summary="KServe v2: a task's readiness")
    @app.get("/v2/models/{task:path}/versions/{version}/ready", summary="KServe v2: a task's readiness")
    async def v2_model_ready(task: str, request: Request, version: str | None = None):
        check_version(version)
        check_model(engine_of(request), task)  # 404 if unknown: a task added at run time is ready at once
        return {"name": task, "ready": True}

    @app.post("/v2/models/{task:path}/infer", summary="KServe v2: classify (JSON or binary tensors)")
    @app.post("/v2/models/{task:path}/versions/{version}/infer", summary="KServe v2: classify")
    async def v2_infer(task: str, request: Request, version: str | None = None):
        check_version(version)
        engine = engine_of(request)
        request.state.task = metric_task(engine, task)
        head, arrays = parse_request(await request.body(), request.headers.get(HEADER))
        wanted = requested_outputs(head)
        try:
            out = await infer(engine, task, arrays, [n for n, _ in wanted], lambda future, cancel: await_job(
                request, future, cancel, options.request_timeout))
        except ClientGone:
            return Response(status_code=499)
        reply = {"model_name": task, "model_version": "1", **({"id": head["id"]} if "id" in head else {})}
        body, headers = response_body(reply, [(n, OUTPUT_TYPES[n], out[n], binary) for n, binary in wanted])
        return Response(body, headers=headers)

    async def queued_generation(task: str, request: Request):
        """A generate request checked, admitted and queued: (engine, job, release, {"id": its id} or {})."""
        engine = engine_of(request)
        request.state.task = metric_task(engine, task)
        req, rid = _completion(task, await request.body())
        try:
            job, _ = completion_job(engine, req, options)
        except ApiError as e:  # the checks /v1/completions shares name its fields: say the generate request's
            e.field = _v2_field(e.field)
            raise
        release = engine.admit("generate")
        try:
            engine.submit(job)
        except BaseException:
            release()
            raise
        return engine, job, release, rid

    @app.post("/v2/models/{task:path}/generate", summary="Triton's generate extension: one completion")
    @app.post("/v2/models/{task:path}/versions/{version}/generate", summary="Triton's generate extension")
    async def v2_generate(task: str, request: Request, version: str | None = None):
        check_version(version)
        engine, job, release, rid = await queued_generation(task, request)
        try:
            rows = await await_job(request, asyncio.ensure_future(collect(job, options.request_timeout)),
                                   lambda: engine.cancel(job), options.request_timeout + 1)
        except ClientGone:
            return Response(status_code=499)
        except ApiError:
            engine.cancel(job)
            raise
        finally:
            release()
        metrics.count_tokens(task, rows[0]["tokens"])
        return JSONResponse({"model_name": task, "model_version": "1", **rid, "text_output": rows[0]["text"]})

    @app.post("/v2/models/{task:path}/generate_stream", summary="Triton's generate extension: server-sent events, "
                                                                "one per token")
    @app.post("/v2/models/{task:path}/versions/{version}/generate_stream", summary="Triton's generate extension")
    async def v2_generate_stream(task: str, request: Request, version: str | None = None):
        check_version(version)
        engine, job, release, rid = await queued_generation(task, request)

        def on_close():
            engine.cancel(job)
            release()
        return CancelOnClose(_events(job, task, options.request_timeout, metrics, rid), on_close=on_close,
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v2/models/{task:path}", summary="KServe v2: a task's metadata (inputs, outputs)")
    @app.get("/v2/models/{task:path}/versions/{version}", summary="KServe v2: a task's metadata")
    async def v2_model(task: str, request: Request, version: str | None = None):
        engine = engine_of(request)
        posted = next((s for s in POST_ONLY if task.endswith(s)), None)
        if posted and task not in engine.rt.bank:  # GET on a POST route: {task:path} took "pt/infer" for a name
            raise ApiError(405, "method_not_allowed", "method", f"{posted} takes POST", {"Allow": "POST"})
        check_version(version)
        return model_metadata(engine, task)


def _v2_field(field: str | None) -> str | None:
    """A /v1/completions field as the generate request names it: the prompt is text_input, the rest parameters."""
    base = (field or "").split("[")[0]
    if base == "prompt":
        return "text_input"
    return f"parameters.{field}" if base in GENERATE_PARAMETERS else field


def _completion(task: str, raw: bytes) -> tuple[CompletionRequest, dict]:
    """The generate request {"text_input", "parameters": {...}[, "id"]} as the completion request it is, and
    {"id": its id} where it gave one (echoed in the response, as /infer echoes it), else {}."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", "body", f"body: malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("body", "the body must be a JSON object")
    unknown = set(body) - {"text_input", "parameters", "id"}
    if unknown:
        raise bad(min(unknown), "unknown field; give text_input and parameters")
    text = body.get("text_input")
    if not isinstance(text, str):
        raise bad("text_input", "give the prompt as a string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("parameters", "give the parameters as an object")
    for name in params:
        if name not in GENERATE_PARAMETERS:
            raise bad(f"parameters.{name}", f"unknown parameter; one of {', '.join(GENERATE_PARAMETERS)}")
    try:
        return CompletionRequest.model_validate({"model": task, "prompt": text, **params}), (
            {"id": body["id"]} if "id" in body else {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        field = "text_input" if where.startswith("prompt") else f"parameters.{where}"
        raise bad(field, err.get("msg", "invalid value")) from None


async def _events(job, task: str, timeout: float, metrics: Metrics, rid: dict):
    """Server-sent events: one per token, {"model_name", "model_version"[, "id"], "text_output": the token's text}."""
    tokens = 0
    try:
        async for event in job_events(job, timeout):
            if event[0] == "token":
                tokens += event[3] is not None
                yield "data: " + json.dumps({"model_name": task, "model_version": "1", **rid,
                                             "text_output": event[2]}) + "\n\n"
    except ApiError as e:  # the response has started: the error goes in the stream
        yield "data: " + json.dumps({"error": e.message}) + "\n\n"
    finally:
        metrics.count_tokens(task, tokens)
