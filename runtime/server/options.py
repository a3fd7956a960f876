"""ServeOptions: every setting of a server (one process or a Ray replica); no web framework needed to import it."""

from __future__ import annotations

from dataclasses import dataclass


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
    # Admin task changes go to the deployment's task store: they survive a restart, and every server and replica
    # on the store sees them at its next lookup of the task (the store is then the replicas' log). Off: changes
    # stay in this server (the first one copies the bank into memory).
    persist_tasks: bool = False
    # Completions for the base model (served_model_name, default: the deployment folder's name) may carry their own
    # soft prompt (prompt_embeds); off: such a request gets a 400 that says how to turn it on.
    allow_inline_prompts: bool = False
    served_model_name: str | None = None
    bank_cache_mb: float | None = None  # task views kept in RAM (default: core/bank.py DEFAULT_CACHE_BYTES)
    kv_cache_mb: float | None = None  # causal LMs: prompt key/values kept (default: generate.py DEFAULT_KV_CACHE_BYTES)
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # Admission (see Engine.admit): beyond either limit a model request gets 503 + Retry-After at once.
    max_inflight: int | None = None  # classify/completions requests being served; None: 4 * max_batch
    max_queue_wait: float = 1.0  # seconds the oldest request of a queue (classify, generate) may have waited
    # Slow and abusive clients (http.py): uvicorn only.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    grpc_port: int | None = None  # KServe v2 over gRPC on this port too (0: any free port); None: off
    grpc_host: str = "127.0.0.1"
    docs: bool = False  # /docs and /redoc: Swagger UI / ReDoc load their scripts from a public CDN, so off by default
