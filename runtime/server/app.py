"""create_app(): the FastAPI app assembled (lifespan, probes, model and admin routes, error handlers, middleware).

The Runtime and the scheduler's worker thread start in the app's lifespan, so the same app runs under uvicorn
(http.serve) and as a Ray Serve replica (ray.py). Model calls run on the scheduler's worker thread; the event
loop validates, tokenizes and routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from .admin import add_admin_routes, follow_tasks, sync_tasks
from .api_errors import add_error_handlers
from .inference import add_model_routes
from .kserve_http import add_kserve_routes
from .metrics import Metrics
from .middleware import BodyLimit, MetricsMiddleware
from .options import ServeOptions
from .replica import Engine, engine_of, task_page
from .schemas import ErrorResponse, Health, ModelList, TaskPage

log = logging.getLogger("promptmux.serve")


def create_app(deploy_dir: str | Path, options: ServeOptions | None = None, task_log=None) -> FastAPI:
    """task_log: shared by the replicas of one deployment (ray.py), so that a task added or removed through
    any of them reaches all; None for a single server."""
    options = options or ServeOptions()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading takes seconds: off the loop, so a Ray replica's control messages are not blocked.
        try:
            engine = app.state.engine = await asyncio.to_thread(Engine, deploy_dir, options, metrics)
        except Exception as e:  # the reason in one line, before the server's own traceback and exit
            log.error("error: cannot load %s: %s", deploy_dir, e)  # (the CLI's log lines start "promptmux: ")
            raise
        grpc_server = None
        if options.grpc_port is not None:  # KServe v2 over gRPC: this loop, this engine (kserve_grpc.py)
            from .kserve_grpc import start

            grpc_server, app.state.grpc_port = await start(app, metrics, options.grpc_host, options.grpc_port,
                                                           options.max_body_bytes)
        follower = None
        if task_log is not None:
            await sync_tasks(engine, task_log)  # a new replica starts with the changes made so far
            follower = asyncio.create_task(follow_tasks(engine, task_log))
        try:
            yield
        finally:
            app.state.draining = True
            if follower is not None:
                follower.cancel()
            if grpc_server is not None:  # calls in flight get the drain time, new ones are refused
                await grpc_server.stop(options.drain_timeout)
            engine.stop()

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="promptmux", version=_version(), lifespan=lifespan, **docs,
                  description="Every task of a promptmux deployment behind one endpoint: mixed-task batching for "
                              "classification, continuous batching for generation.")
    app.state.engine = None
    app.state.grpc_port = None
    app.state.draining = False
    app.state.options = options
    app.state.metrics = metrics
    add_error_handlers(app)
    _add_probes(app, metrics)
    add_model_routes(app, options, metrics)
    add_kserve_routes(app, options, metrics)
    add_admin_routes(app, options, task_log)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _add_probes(app: FastAPI, metrics: Metrics) -> None:
    """Liveness, readiness, Prometheus metrics and the model list."""

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="liveness: the process answers (tasks, backend, precision and the prepared engines once loaded)")
    async def health(request: Request):
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            return {"status": "ok"}
        return {"status": "ok", "tasks": len(engine.rt.bank), "backend": engine.rt.backend,
                "backend_reason": engine.rt.backend_reason, "precision": engine.rt.precision,
                "routing": engine.rt.routing.describe() if engine.rt.backend == "onnxruntime+openvino" else None,
                "prepared": engine.rt.prepared}

    @app.get("/ready", response_model=Health, responses={503: {"model": ErrorResponse}},
             summary="readiness: the engine is loaded and not draining")
    async def ready(request: Request):
        engine = engine_of(request)
        return {"status": "ready", "tasks": len(engine.rt.bank)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorResponse}},
             summary="the tasks served (OpenAI model list: id = task name), a page at a time")
    async def models(request: Request, page: TaskPage = Depends()):
        engine = engine_of(request)
        served = engine.served_name if engine.family.generation else None
        if served is not None and page.after is None:
            # The first page starts with the base model's own name (completions with or without their own prompt)
            # and it counts toward the limit; as a cursor it means "the tasks from the first" (no task has it).
            names, more = task_page(engine.rt.bank, TaskPage(page.limit - 1, None))
            ids = [served] + names
        else:
            names, more = task_page(engine.rt.bank, TaskPage(page.limit, None) if page.after == served else page)
            ids = names
        return {"object": "list", "data": [{"id": t} for t in ids], "has_more": more,
                "last_id": ids[-1] if ids else None}


def _version() -> str:
    from promptmux import __version__

    return __version__
