"""The HTTP server: every task of a deployment behind one endpoint (FastAPI on uvicorn).

create_app() builds the ASGI app; the Runtime and the scheduler's worker thread start in its lifespan, so
the same app runs under uvicorn (serve()) and as a Ray Serve replica (serve_ray.py). Model calls run on
the scheduler's worker thread; the event loop validates, tokenizes and routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptmux.core.bank import UnknownTaskError
from .generate import SamplingParams
from .scheduler import ClassifyJob, GenerateJob, JobTimeout, Overloaded, Scheduler
from .serve_metrics import Metrics
from .server_schemas import (
    MAX_PROMPTS,
    MAX_STOPS,
    AddTaskRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
    TaskChange,
    TaskList,
)
from .text import load_tokenizer, too_long

log = logging.getLogger("promptmux.serve")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class ServeOptions:
    backend: str = "auto"
    precision: str = "fp32"
    strict: bool = False  # refuse a non-exact precision that misses its accuracy contract
    calibration: str | None = None  # texts file a non-exact precision is measured on (default: generated)
    threads: int | None = None
    max_batch: int = 32  # texts per classification batch; rows in the running generation batch
    max_wait_ms: float = 5.0  # how long the oldest classification request waits for a fuller batch
    max_queue: int = 1024  # texts / prompts waiting; beyond it: 503 + Retry-After
    request_timeout: float = 60.0  # seconds, per request (504 after it)
    max_body_bytes: int = 1 << 20
    admin_token: str | None = None  # task administration is off unless set
    adapter_root: str | None = None  # the only folder the admin endpoint reads adapters from
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # Admission (see Engine.admit): beyond either limit a model request gets 503 + Retry-After at once.
    max_inflight: int | None = None  # classify/completions requests being served; None: 4 * max_batch
    max_queue_wait: float = 1.0  # seconds the oldest queued request of a kind may have waited
    # Slow and abusive clients (server_http.py): uvicorn only.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    docs: bool = False  # /docs and /redoc: Swagger UI / ReDoc load their scripts from a public CDN, so off by default


class ApiError(Exception):
    def __init__(self, status: int, type_: str, field: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.field, self.message, self.headers = status, type_, field, message, headers


def error_response(request_or_scope, status: int, type_: str, field: str | None, message: str,
                   headers: dict | None = None) -> JSONResponse:
    scope = request_or_scope.scope if isinstance(request_or_scope, Request) else request_or_scope
    scope.setdefault("state", {})["error_type"] = type_  # read by the metrics middleware
    return _AsciiJSON({"error": {"type": type_, "field": field, "message": message}}, status, headers=headers)


class _AsciiJSON(JSONResponse):
    """Errors may quote what a client sent (a field name with a lone surrogate): escaped, they always encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 503, 504)}
ADMIN_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 415, 503)}


# ---- ASGI middleware ---------------------------------------------------------------------------
class BodyLimit:
    """413 for bodies over the limit, by Content-Length or as a chunked body arrives (nothing larger is ever
    buffered); the body is then replayed to the app, and later receive() calls (disconnect) pass through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and (not declared.isdigit() or int(declared) > self.limit)
        chunks, size = [], 0
        while not too_large:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)  # a disconnect while the body arrives
                break
            size += len(message.get("body", b""))
            too_large = size > self.limit
            chunks.append(message)
            if not message.get("more_body"):
                break
        if too_large:
            response = error_response(scope, 413, "too_large", "body",
                                      f"request body over {self.limit} bytes")
            return await response(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        if chunks and chunks[-1]["type"] != "http.request":
            replay.append(chunks[-1])

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return await self.app(scope, replayed, send)


class MetricsMiddleware:
    """Counts every response (status, endpoint, task), its latency until the last byte, errors by type; tags
    responses with the worker that answered (x-promptmux-worker: useful behind Ray's proxy)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def tagged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-promptmux-worker", WORKER_ID.encode()))
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, tagged)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            state = scope.get("state") or {}
            self.metrics.record(endpoint, state.get("task", ""), status[0], time.perf_counter() - start,
                                state.get("error_type"))


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


# ---- the engine of one server process / replica -------------------------------------------------
class Engine:
    def __init__(self, deploy_dir: str | Path, options: ServeOptions, metrics: Metrics):
        from .runtime import Runtime

        self.options = options
        from .precision import calibration_texts

        texts = calibration_texts(options.calibration) if options.calibration else None
        self.rt = Runtime(deploy_dir, backend=options.backend, threads=options.threads, precision=options.precision,
                          strict=options.strict, calibration=texts)
        try:  # the loop thread's own tokenizer (encoding); the worker decodes with the runtime's
            self.tok = load_tokenizer(self.rt.dir)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{deploy_dir} has no tokenizer ({e}); the server takes text") from None
        self.family = self.rt.spec.family
        self.max_positions = self.rt.max_positions  # the positions a row may use
        # More than 32 characters per token is beyond the tokenizers we know: longer texts are refused before
        # any time goes into tokenizing them.
        self.max_chars = 32 * (self.max_positions or 4096)
        self.applied = 0  # changes of a shared task log applied (serve_ray.py)
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
        except UnknownTaskError:
            raise ApiError(404, "unknown_task", field, f"unknown task {task!r}; GET /v1/models lists the tasks "
                                                       "served") from None

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
            if room and too_long(len(row) + room, view.num_virtual_tokens, view.name, limit):
                raise ApiError(400, "invalid_request", "max_tokens",
                               f"{len(row)} tokens + {view.num_virtual_tokens} virtual tokens of task {view.name!r} "
                               f"+ max_tokens={room} exceed the model's {limit} positions")
        return ids, enc.get("token_type_ids")

    def admit(self, kind: str):
        """The admission rule: a model request is admitted while fewer than max_inflight are being served and
        the oldest request waiting in its kind's queue has waited under max_queue_wait; otherwise it gets 503 +
        Retry-After at once, instead of a latency that grows with the crowd. Returns the release to call when
        the response ends (idempotent)."""
        limit = self.options.max_inflight or 4 * self.options.max_batch
        if self.inflight >= limit:
            raise ApiError(503, "overloaded", None, f"{self.inflight} requests in flight; retry later",
                           {"Retry-After": "1"})
        waited = self.scheduler.oldest_wait(kind)
        if waited > self.options.max_queue_wait:
            raise ApiError(503, "overloaded", None, f"the oldest queued request has waited {waited:.1f} s; retry "
                                                    "later", {"Retry-After": "1"})
        self.inflight += 1
        released = []

        def release():
            if not released:
                released.append(True)
                self.inflight -= 1
        return release

    def stop(self) -> None:
        self.scheduler.stop()


def _engine(request: Request) -> Engine:
    app = request.app
    engine = getattr(app.state, "engine", None)
    if engine is None or app.state.draining or not engine.scheduler.alive:
        raise ApiError(503, "overloaded", None, "the server is starting or shutting down", {"Retry-After": "1"})
    return engine


async def _await_job(request: Request, work: asyncio.Future, on_cancel, timeout: float):
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
                    raise _ClientGone()
                watch = asyncio.ensure_future(request.receive())
                continue
            on_cancel()
            raise ApiError(504, "timeout", None, f"the request took longer than {timeout:g} s")
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()


class _ClientGone(Exception):
    pass


_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _sampling(req: CompletionRequest) -> SamplingParams:
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


def _field_of(loc) -> str | None:
    """('body', 'prompt', 'list[str]', 2) -> 'prompt[2]': the top-level field, and the item index if any."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return "body"
    name = str(parts[0])
    index = next((p for p in parts[1:] if isinstance(p, int)), None)
    return name if index is None else f"{name}[{index}]"


# ---- the app --------------------------------------------------------------------------------------
def create_app(deploy_dir: str | Path, options: ServeOptions | None = None, task_log=None) -> FastAPI:
    """task_log: shared by the replicas of one deployment (serve_ray.py), so that a task added or removed through
    any of them reaches all; None for a single server."""
    options = options or ServeOptions()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading takes seconds: off the loop, so a Ray replica's control messages are not blocked.
        try:
            engine = app.state.engine = await asyncio.to_thread(Engine, deploy_dir, options, metrics)
        except Exception as e:  # the reason in one line, before the server's own traceback and exit
            log.error("promptmux: error: cannot load %s: %s", deploy_dir, e)
            raise
        follower = None
        if task_log is not None:
            await _sync_tasks(engine, task_log)  # a new replica starts with the changes made so far
            follower = asyncio.create_task(_follow_tasks(engine, task_log))
        try:
            yield
        finally:
            app.state.draining = True
            if follower is not None:
                follower.cancel()
            engine.stop()

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="promptmux", version=_version(), lifespan=lifespan, **docs,
                  description="Every task of a promptmux deployment behind one endpoint: mixed-task batching for "
                              "classification, continuous batching for generation.")
    app.state.engine = None
    app.state.draining = False
    app.state.options = options
    app.state.metrics = metrics
    bearer = HTTPBearer(auto_error=False, description="the --admin-token given at start-up")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.type, e.field, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors() or [{}]
        # A union (prompt: a string or a list) reports each branch; the value error says what is wrong.
        err = next((x for x in errors if x.get("type") == "value_error"), errors[0])
        if err.get("type") == "json_invalid":
            return error_response(request, 400, "invalid_json", "body", f"malformed JSON: {err.get('msg', '')}")
        field = _field_of(err.get("loc", ()))
        message = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid value")
        if field == "body":
            content_type = request.headers.get("content-type", "")
            if isinstance(err.get("input"), (bytes, str)) and "json" not in content_type:
                return error_response(request, 415, "unsupported_media_type", "content-type",
                                      "send the body as JSON with Content-Type: application/json")
            message = "the body must be a JSON object"
        return error_response(request, 400, "invalid_request", field, f"{field}: {message}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: ("not_found", "path"), 405: ("method_not_allowed", "method")}.get(e.status_code,
                                                                                         ("invalid_request", None))
        return error_response(request, e.status_code, kind[0], kind[1], str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("error serving %s", request.url.path)
        return error_response(request, 500, "internal", None, "internal error")

    # ---- probes and metrics ---------------------------------------------------------------------
    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="liveness: the process answers (tasks, backend and precision once the engine is loaded)")
    async def health(request: Request):
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            return {"status": "ok"}
        return {"status": "ok", "tasks": len(engine.rt.bank), "backend": engine.rt.backend,
                "precision": engine.rt.precision}

    @app.get("/ready", response_model=Health, responses={503: {"model": ErrorResponse}},
             summary="readiness: the engine is loaded and not draining")
    async def ready(request: Request):
        engine = _engine(request)
        return {"status": "ready", "tasks": len(engine.rt.bank)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorResponse}},
             summary="the tasks served (OpenAI model list: id = task name)")
    async def models(request: Request):
        engine = _engine(request)
        return {"object": "list", "data": [{"id": t} for t in engine.rt.tasks]}

    # ---- classification -------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="classify text(s) with one task; requests of all tasks share batches")
    async def classify(body: ClassifyRequest, request: Request):
        engine = _engine(request)
        if engine.family != "encoder":
            raise ApiError(400, "invalid_request", "task", "this deployment generates text: use /v1/completions")
        if (body.text is None) == (body.texts is None):
            raise ApiError(400, "invalid_request", "text", "give exactly one of text or texts")
        view = engine.capture(body.task, "task")
        request.state.task = body.task
        single = body.text is not None
        ids, types = engine.encode([body.text] if single else body.texts, view, "text" if single else "texts",
                                   single)
        loop = asyncio.get_running_loop()
        job = ClassifyJob(ids=ids, types=types, view=view,
                          deadline=time.monotonic() + options.request_timeout, loop=loop, future=loop.create_future())
        release = engine.admit("classify")
        try:
            _submit(engine.scheduler.submit_classify, job)
            results = await _await_job(request, job.future, lambda: _cancel(engine, job), options.request_timeout)
        except _ClientGone:
            return Response(status_code=499)
        except JobTimeout as e:
            raise ApiError(504, "timeout", None, str(e)) from None
        finally:
            release()
        return {"task": body.task, "labels": view.labels, "results": results}

    # ---- completions ----------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses={
        **ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "a completion, or with stream=true server-sent events"}},
              summary="OpenAI-compatible completions; model = task; continuous batching across tasks")
    async def completions(body: CompletionRequest, request: Request):
        engine = _engine(request)
        if engine.family == "encoder":
            raise ApiError(400, "invalid_request", "model", "this deployment classifies: use /v1/classify")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ApiError(400, "invalid_request", "prompt", f"give 1 to {MAX_PROMPTS} prompts")
        params = _sampling(body)
        if engine.max_positions and body.max_tokens > engine.max_positions:
            raise ApiError(400, "invalid_request", "max_tokens",
                           f"max_tokens={body.max_tokens} exceeds the model's {engine.max_positions} positions")
        view = engine.capture(body.model, "model")
        request.state.task = body.model
        room = 0 if engine.family == "seq2seq" else body.max_tokens  # a seq2seq prompt goes to the encoder
        ids, _ = engine.encode(prompts, view, "prompt", isinstance(body.prompt, str), room)
        loop = asyncio.get_running_loop()
        job = GenerateJob(prompts=ids, view=view, params=params, tokenizer=engine.rt.tokenizer,
                          deadline=time.monotonic() + options.request_timeout, loop=loop)
        release = engine.admit("generate")
        streaming = False
        try:
            _submit(engine.scheduler.submit_generate, job)
            cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if body.stream:
                streaming = True  # released when the stream ends

                def on_close():
                    _cancel(engine, job)
                    release()
                return CancelOnClose(_sse(job, cid, created, body.model, options.request_timeout, engine),
                                     on_close=on_close, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
            rows = await _await_job(request, asyncio.ensure_future(_collect(job, options.request_timeout)),
                                    lambda: _cancel(engine, job), options.request_timeout + 1)
        except _ClientGone:
            return Response(status_code=499)
        except ApiError:
            _cancel(engine, job)  # e.g. one of its rows failed: its other rows leave the batch
            raise
        finally:
            if not streaming:
                release()
        engine_metrics_tokens(metrics, body.model, rows)
        choices = [{"index": i, "text": r["text"], "finish_reason": _FINISH[r["finish"]], "logprobs": None}
                   for i, r in enumerate(rows)]
        prompt_tokens = sum(len(x) for x in ids)
        completion_tokens = sum(r["tokens"] for r in rows)
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    # ---- task administration --------------------------------------------------------------------
    def admin(request: Request, creds: HTTPAuthorizationCredentials | None) -> Engine:
        if not options.admin_token:
            raise ApiError(403, "forbidden", "authorization", "task administration is off (start the server with "
                                                              "--admin-token)")
        if creds is None or creds.scheme.lower() != "bearer" or not hmac.compare_digest(
                creds.credentials.encode(), options.admin_token.encode()):
            raise ApiError(401, "unauthorized", "authorization", "a valid bearer token is required",
                           {"WWW-Authenticate": "Bearer"})
        return _engine(request)

    @app.get("/v1/tasks", response_model=TaskList, responses=ADMIN_ERRORS, summary="the tasks in detail (admin)")
    async def list_tasks(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        engine = admin(request, creds)
        return {"tasks": engine.rt.bank.describe()}

    @app.post("/v1/tasks", response_model=TaskChange, responses=ADMIN_ERRORS,
              summary="add a task from a PEFT adapter folder under the server's --adapter-root (admin)")
    async def add_task(body: AddTaskRequest, request: Request,
                       creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        engine = admin(request, creds)
        if not options.adapter_root:
            raise ApiError(403, "forbidden", "adapter", "no --adapter-root was given at start-up")
        if "/" in body.name or body.name.strip() != body.name or not body.name.isprintable():
            raise ApiError(400, "invalid_request", "name", "a task name has no '/', surrounding spaces or control "
                                                           "characters")
        folder = _adapter_folder(options.adapter_root, body.adapter)
        added = await _change_tasks(engine, task_log, {"action": "add", "name": body.name, "folder": str(folder),
                                                       "replace": body.replace})
        log.warning("task(s) %s added from %s", added, body.adapter)
        return {"added": added, "tasks": engine.rt.tasks}

    @app.delete("/v1/tasks/{name:path}", response_model=TaskChange, responses=ADMIN_ERRORS,
                summary="remove a task (an MPT adapter's NAME removes NAME/0 ...); its requests in flight finish")
    async def remove_task(name: str, request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        engine = admin(request, creds)
        removed = await _change_tasks(engine, task_log, {"action": "remove", "name": name})
        log.warning("task(s) %s removed", removed)
        return {"removed": removed, "tasks": engine.rt.tasks}

    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def engine_metrics_tokens(metrics: Metrics, task: str, rows: list[dict]) -> None:
    metrics.tokens.labels(task).inc(sum(r["tokens"] for r in rows))


def _submit(submit, job) -> None:
    try:
        submit(job)
    except Overloaded as e:
        raise ApiError(503, "overloaded", None, f"{e}; retry later", {"Retry-After": "1"}) from None


def _cancel(engine: Engine, job) -> None:
    if not job.cancelled:
        job.cancelled = True
        engine.scheduler.wake()


def _apply_change(engine: Engine, op: dict) -> list[str]:
    """Add or remove a task in this engine's bank (a thread: reading an adapter takes a while). The bank swap
    itself is one reference assignment; requests in flight keep the views they captured."""
    from promptmux.core.adapters import AdapterError

    if op["action"] == "remove":
        try:
            return engine.rt.remove_task(op["name"])
        except UnknownTaskError as e:
            raise ApiError(404, "unknown_task", "name", str(e)) from None
    root = str(Path(engine.options.adapter_root).resolve())

    def private(e: Exception) -> str:  # messages name the adapter folder without revealing the server's paths
        return str(e).replace(root, "<adapter-root>")

    try:
        return engine.rt.add_task(op["name"], op["folder"], False, op["replace"], root=root)
    except AdapterError as e:
        raise ApiError(400, "invalid_request", "adapter", private(e)) from None
    except ValueError as e:
        if "already in the bank" in str(e):
            raise ApiError(409, "conflict", "name", str(e)) from None
        raise ApiError(400, "invalid_request", "adapter", private(e)) from None


async def _change_tasks(engine: Engine, task_log, op: dict) -> list[str]:
    if task_log is None:
        return await asyncio.to_thread(_apply_change, engine, op)
    # Replicas apply every change in the log's order, this one included: they all end with the same bank.
    op = dict(op, id=uuid.uuid4().hex)
    await task_log.append(op)
    for _ in range(100):
        outcome = await _sync_tasks(engine, task_log, op["id"])
        if outcome is not None:
            if isinstance(outcome, ApiError):
                raise outcome
            return outcome
    raise ApiError(503, "overloaded", None, "the task change was logged but not applied yet", {"Retry-After": "1"})


async def _sync_tasks(engine: Engine, task_log, wanted: str | None = None):
    """Apply the log's changes this engine has not applied yet; returns the outcome of the change `wanted`."""
    outcome = None
    async with engine.sync_lock:
        for op in await task_log.since(engine.applied):
            try:
                result = await asyncio.to_thread(_apply_change, engine, op)
            except ApiError as e:  # the replica that took the request reports it; the others skip the change
                result = e
            engine.applied += 1
            if op.get("id") == wanted:
                outcome = result
    return outcome


async def _follow_tasks(engine: Engine, task_log, period: float = 1.0) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await _sync_tasks(engine, task_log)
        except Exception:  # the log is unreachable for a moment: try again next period
            log.exception("task log sync failed")


def _adapter_folder(root: str, rel: str) -> Path:
    """rel resolved under root (symlinks included); anything that would leave the root is refused."""
    base = Path(root).resolve()
    if "\x00" in rel or rel.startswith(("/", "\\")) or Path(rel).is_absolute():
        raise ApiError(400, "invalid_request", "adapter", "give the adapter folder relative to the adapter root")
    try:
        path = (base / rel).resolve()
        inside = path != base and path.is_relative_to(base)
        exists = inside and path.is_dir()
    except (OSError, RuntimeError) as e:  # a name too long; a symlink loop (RuntimeError before Python 3.13)
        raise ApiError(400, "invalid_request", "adapter",
                       f"not a usable adapter folder name ({getattr(e, 'strerror', None) or 'symlink loop'})") from None
    if not inside:
        raise ApiError(400, "invalid_request", "adapter", "the adapter folder must lie under the adapter root")
    if not exists:
        raise ApiError(404, "not_found", "adapter", f"no adapter folder {rel!r} under the adapter root")
    return path


async def _job_events(job: GenerateJob, timeout: float):
    """The job's events as the worker sends them, until every row has finished."""
    left = len(job.prompts)
    deadline = time.monotonic() + timeout + 1.0  # the worker enforces the deadline; this guards the worker itself
    while left:
        try:
            events = await asyncio.wait_for(job.queue.get(), max(deadline - time.monotonic(), 0.01))
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(504, "timeout", None, f"the request took longer than {timeout:g} s") from None
        for event in events:
            if event[0] == "error":  # this request's rows only: the others in the batch go on
                raise ApiError(500, "internal", None, "generation failed")
            if event[0] == "finish":
                left -= 1
                if event[2] == "timeout":
                    raise ApiError(504, "timeout", None, f"the request took longer than {timeout:g} s")
            yield event


async def _collect(job: GenerateJob, timeout: float) -> list[dict]:
    rows = [{"text": "", "tokens": 0, "finish": None} for _ in job.prompts]
    async for event in _job_events(job, timeout):
        row = rows[event[1]]
        if event[0] == "token":
            row["text"] += event[2]
            row["tokens"] += event[3] is not None
        else:
            row["finish"] = event[2]
    return rows


async def _sse(job: GenerateJob, cid: str, created: int, model: str, timeout: float, engine: Engine):
    def chunk(index, text, finish):
        return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [{"index": index, "text": text, "finish_reason": finish,
                                                   "logprobs": None}]}) + "\n\n"

    tokens = 0
    try:
        async for event in _job_events(job, timeout):
            if event[0] == "token":
                tokens += event[3] is not None
                if event[2]:
                    yield chunk(event[1], event[2], None)
            else:
                yield chunk(event[1], "", _FINISH[event[2]])
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the response has started: the error goes in the stream
        yield "data: " + json.dumps({"error": {"type": e.type, "field": e.field, "message": e.message}}) + "\n\n"
    finally:
        engine_metrics_tokens(engine.scheduler.metrics, model, [{"tokens": tokens}])


def _version() -> str:
    from promptmux import __version__

    return __version__


# ---- running it -----------------------------------------------------------------------------------
def serve(deploy_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          log_level: str = "warning") -> None:
    """Run the server until SIGTERM / SIGINT, which drain: no new connections, in-flight requests finish (up
    to options.drain_timeout), then the worker stops."""
    import uvicorn

    options = options or ServeOptions()
    app = create_app(deploy_dir, options)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so that --port 0 can report the port it got
    bound = sock.getsockname()[1]

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # /ready says 503 at once; requests in flight go on
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(json.dumps({"serving": f"http://{host}:{bound}", "pid": os.getpid()}), flush=True)

    from .server_http import guarded_protocol

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=options.drain_timeout,
                            access_log=False, timeout_keep_alive=5,
                            http=guarded_protocol(options.header_timeout, options.body_timeout,
                                                  options.max_header_bytes))
    Server(config).run(sockets=[sock])
