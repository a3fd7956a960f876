"""Prometheus metrics of the server (prometheus-client), in a registry of their own per app."""

from __future__ import annotations

from collections import Counter as _Count

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        # task: the request's task once it is known to the bank, else "" (clients cannot mint label values).
        self.requests = Counter("promptmux_requests", "HTTP requests answered", ["endpoint", "task", "status"],
                                registry=r)
        self.errors = Counter("promptmux_request_errors", "Requests answered with an error, by error type",
                              ["endpoint", "task", "type"], registry=r)
        self.latency = Histogram("promptmux_request_latency_seconds", "Request latency until the last byte",
                                 ["endpoint", "task"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("promptmux_batch_size", "Rows per model call: a classification batch, or the "
                                    "running rows of a generation step", ["queue"], buckets=_SIZES, registry=r)
        self.batch_task_rows = Histogram("promptmux_batch_task_rows", "Rows of each task in a batch",
                                         ["queue", "task"], buckets=_SIZES, registry=r)
        self.batch_tasks = Histogram("promptmux_batch_tasks", "Distinct tasks in a batch", ["queue"],
                                     buckets=_SIZES, registry=r)
        self.queue_depth = Gauge("promptmux_queue_depth", "Texts (classify) or prompts (generate) waiting",
                                 ["queue"], registry=r)
        self.running = Gauge("promptmux_running_rows", "Rows in the running generation batch", registry=r)
        self.inflight = Gauge("promptmux_inflight_requests", "HTTP requests being answered", registry=r)
        self.tasks = Gauge("promptmux_tasks", "Tasks the deployment serves now", registry=r)
        self.bank = {k: Gauge(f"promptmux_bank_{k}", text, registry=r) for k, text in (
            ("store_bytes", "Bytes of the task store on disk"),
            ("cache_bytes", "Bytes of task prompts held in RAM (the hot-task cache)"),
            ("cache_hits", "Task lookups answered from the hot-task cache"),
            ("cache_misses", "Task lookups that read the store"),
            ("loads", "Tasks read from the store"),
            ("load_seconds", "Seconds spent reading tasks from the store"))}
        self.prompt_kv = Gauge("promptmux_prompt_kv_bytes", "Bytes of precomputed prompt key/values held (causal "
                               "LMs; bounded by --kv-cache-mb)", registry=r)
        self.tokens = Counter("promptmux_generated_tokens", "Tokens generated", ["task"], registry=r)

    def bind(self, scheduler) -> None:
        for queue in ("classify", "generate"):
            self.queue_depth.labels(queue).set_function(lambda q=queue: scheduler.depth(q))
        self.running.set_function(scheduler.running)
        self.tasks.set_function(lambda: len(scheduler.rt.bank))

        def bank():  # the runtime's bank as it is now (a change it does not persist replaces it)
            return scheduler.rt.bank

        self.bank["store_bytes"].set_function(lambda: bank().size_bytes())
        self.bank["cache_bytes"].set_function(lambda: bank().cache_used())
        self.bank["cache_hits"].set_function(lambda: bank().stats["hits"])
        self.bank["cache_misses"].set_function(lambda: bank().stats["misses"])
        self.bank["loads"].set_function(lambda: bank().stats["loads"])
        self.bank["load_seconds"].set_function(lambda: bank().stats["load_seconds"])
        self.prompt_kv.set_function(scheduler.rt.prompt_kv_bytes)

    def observe_batch(self, queue: str, tasks: list[str]) -> None:
        counts = _Count(tasks)
        self.batch_size.labels(queue).observe(len(tasks))
        self.batch_tasks.labels(queue).observe(len(counts))
        for task, n in counts.items():
            self.batch_task_rows.labels(queue, task).observe(n)

    def record(self, endpoint: str, task: str, status: int, seconds: float, error_type: str | None) -> None:
        self.requests.labels(endpoint, task, str(status)).inc()
        self.latency.labels(endpoint, task).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, task, error_type or str(status)).inc()

    def count_tokens(self, task: str, n: int) -> None:
        self.tokens.labels(task).inc(n)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
