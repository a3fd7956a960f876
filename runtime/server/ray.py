"""The same HTTP API as a Ray Serve deployment: each replica builds the app of app.py (its own Runtime, bank
and worker thread) and Ray's HTTP proxy spreads requests over the replicas; TaskLog keeps their banks alike.

`promptmux serve DIR --ray` runs it on a local Ray instance, or on the cluster RAY_ADDRESS names. Ray's own
tooling works too, through the application builder `build_app`:

    serve run promptmux.runtime.server.ray:build_app deploy=/shared/deploy replicas=2
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from dataclasses import asdict, fields
from pathlib import Path

from .options import ServeOptions

APP_NAME = "promptmux"


TASK_LOG = "promptmux-task-log"


class TaskLog:
    """The task changes (add/remove) made through any replica, in one order: a named Ray actor that every replica
    reads (at start, after a change it made, and every second), so all replicas end with the same bank."""

    def __init__(self):
        self.ops: list[dict] = []

    def append(self, op: dict) -> int:
        self.ops.append(op)
        return len(self.ops)

    def since(self, n: int) -> list[dict]:
        return self.ops[n:]


class _ActorLog:
    """The replica side of TaskLog, with the awaitable interface create_app (admin.py) expects."""

    def __init__(self, actor):
        self.actor = actor

    async def append(self, op: dict) -> int:
        return await self.actor.append.remote(op)

    async def since(self, n: int) -> list[dict]:
        return await self.actor.since.remote(n)


def task_log_actor(name: str = TASK_LOG):
    """The deployment's task log: created by the first caller, found by the others. Detached (a replica that
    goes away must not take it along); serve_on_ray removes it when the deployment stops."""
    import ray

    return ray.remote(num_cpus=0)(TaskLog).options(name=name, namespace="serve", lifetime="detached",
                                                   get_if_exists=True).remote()


def _multiplexed_replica(tasks_per_replica: int):
    """A deployment class whose replicas register each task they serve as a Ray Serve multiplexed model, so that
    Serve's router sends a task's next requests to a replica that has its prompt key/values cached. Nothing is
    loaded: the first request of a task computes them, as without multiplexing. Returns (class, holder) where
    holder[0] is the replica object once it exists (the app's middleware calls it)."""
    from ray import serve

    holder: list = []

    class TaskReplica:
        def __init__(self):
            holder[:] = [self]

        @serve.multiplexed(max_num_models_per_replica=tasks_per_replica)
        async def load_task(self, task: str) -> str:
            return task

    return TaskReplica, holder


def ray_application(deploy_dir: str | Path, options: ServeOptions, replicas: int = 1, autoscaling: dict | None = None,
                    replica_cpus: float = 1.0, multiplex_tasks: int = 0):
    """The bound Ray Serve application. Every replica needs promptmux installed and the deployment folder at
    the same path (a shared or copied folder on a multi-node cluster). multiplex_tasks > 0: requests that carry
    the header serve_multiplexed_model_id (their task) go preferably to a replica that served that task lately,
    at most this many tasks a replica (studies/ray_multiplexing.py measured it)."""
    from ray import serve

    deploy_dir = str(Path(deploy_dir).resolve())
    if options.threads is None:  # ONNX Runtime threads: the CPUs Ray reserves for the replica
        options = ServeOptions(**{**asdict(options), "threads": max(1, int(replica_cpus))})
    replica_class, holder = _multiplexed_replica(multiplex_tasks) if multiplex_tasks > 0 else (None, None)

    def build():  # runs in each replica: the Runtime is never pickled
        from promptmux.runtime.server.app import create_app

        # With --persist-tasks the replicas share the deployment's store, which is then their log.
        log = None if options.persist_tasks else _ActorLog(task_log_actor())
        app = create_app(deploy_dir, options, task_log=log)
        if holder is not None:
            @app.middleware("http")
            async def register_task(request, call_next):  # what makes Serve route this task here next time
                task = serve.get_multiplexed_model_id()
                if task and holder:
                    await holder[0].load_task(task)
                return await call_next(request)
        return app

    settings = dict(
        name=APP_NAME,
        ray_actor_options={"num_cpus": replica_cpus},
        # Requests a replica takes at once: enough to fill its batches; the rest wait in Ray's router, which
        # answers 503 itself once max_queued_requests wait (the same back-pressure as one server's queue).
        max_ongoing_requests=2 * options.max_batch,
        max_queued_requests=options.max_queue,
        graceful_shutdown_timeout_s=options.drain_timeout,
        health_check_period_s=10,
    )
    if autoscaling:
        settings["autoscaling_config"] = autoscaling
    else:
        settings["num_replicas"] = replicas
    return serve.deployment(**settings)(serve.ingress(build)(replica_class)).bind()


def build_app(args: dict):
    """Ray Serve application builder (`serve run` / `serve deploy` config): args deploy=DIR, replicas=N,
    replica_cpus=C, autoscaling=JSON, multiplex_tasks=N, and any ServeOptions field (max_batch=32, admin_token=..., ...)."""
    args = dict(args)
    deploy = args.pop("deploy")
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("replica_cpus", 1.0))
    autoscaling = args.pop("autoscaling", None)
    multiplex = int(args.pop("multiplex_tasks", 0))
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    types = {f.name: f.type for f in fields(ServeOptions)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; ServeOptions takes {', '.join(types)}")
    casts = {"int": int, "float": float, "str": str}
    opts = {k: v if not isinstance(v, str) else casts.get(types[k].split(" ")[0], str)(v) for k, v in args.items()}
    return ray_application(deploy, ServeOptions(**opts), replicas, autoscaling, cpus, multiplex)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_on_ray(deploy_dir, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                 autoscaling: dict | None = None, replica_cpus: float = 1.0, multiplex_tasks: int = 0) -> None:
    """Run the application until SIGTERM / SIGINT. With RAY_ADDRESS set it joins that cluster and removes only
    its own application at the end; otherwise it starts a local Ray instance and shuts it down."""
    import ray
    from ray import serve

    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, logging_level="warning",
             log_to_driver=False, configure_logging=True)
    port = port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:  # a log left behind by a deployment that did not stop cleanly: this one starts from the folder's bank
        ray.kill(ray.get_actor(TASK_LOG, namespace="serve"))
    except ValueError:
        pass
    try:
        serve.run(ray_application(deploy_dir, options, replicas, autoscaling, replica_cpus, multiplex_tasks),
                  name=APP_NAME, route_prefix="/")
        print(json.dumps({"serving": f"http://{host}:{port}", "pid": os.getpid(), "ray": True,
                          "replicas": "autoscaling" if autoscaling else replicas}), flush=True)
        stop.wait()
    finally:
        # Replicas drain (graceful_shutdown_timeout_s) as Serve removes them.
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        try:
            ray.kill(ray.get_actor(TASK_LOG, namespace="serve"))
        except ValueError:  # never created
            pass
        if not address:
            ray.shutdown()
