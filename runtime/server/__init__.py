"""The HTTP server: every task of a deployment behind one endpoint (FastAPI on uvicorn, or Ray Serve replicas).

Modules: options (ServeOptions), app (create_app: the assembly), engine (Runtime + scheduler glue, admission),
inference (/v1/classify, /v1/completions), streaming (worker events -> rows or SSE), admin (/v1/tasks and
the replicas' task log), errors (ApiError and the handlers), middleware (body cap, metrics), metrics
(Prometheus), schemas (request/response models), http (serve(): uvicorn with slow-client limits), ray (Ray Serve).
"""

from .app import create_app
from .http import serve
from .options import ServeOptions

__all__ = ["ServeOptions", "create_app", "serve"]
