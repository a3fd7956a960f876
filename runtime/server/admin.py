"""Task administration: the bearer-guarded /v1/tasks endpoints and the shared task log replicas follow."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from promptmux.core.bank import UnknownTaskError

from .api_errors import ADMIN_ERRORS, ApiError, overloaded
from .options import ServeOptions
from .replica import Engine, engine_of, task_page
from .schemas import AddTaskRequest, TaskChange, TaskList, TaskPage, UploadTasksRequest

log = logging.getLogger("promptmux.serve")


def add_admin_routes(app: FastAPI, options: ServeOptions, task_log=None) -> None:
    """task_log: shared by the replicas of one deployment (ray.py), so that a task added or removed through any
    of them reaches all; None for a single server."""
    bearer = HTTPBearer(auto_error=False, description="the --admin-token given at start-up")

    def admin(request: Request, creds: HTTPAuthorizationCredentials | None) -> Engine:
        if not options.admin_token:
            raise ApiError(403, "forbidden", "authorization", "task administration is off (start the server with "
                                                              "--admin-token)")
        if creds is None or creds.scheme.lower() != "bearer" or not hmac.compare_digest(
                creds.credentials.encode(), options.admin_token.encode()):
            raise ApiError(401, "unauthorized", "authorization", "a valid bearer token is required",
                           {"WWW-Authenticate": "Bearer"})
        return engine_of(request)

    @app.get("/v1/tasks", response_model=TaskList, responses=ADMIN_ERRORS,
             summary="the tasks in detail, a page at a time (admin)")
    async def list_tasks(request: Request, page: TaskPage = Depends(),
                         creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        bank = admin(request, creds).rt.bank  # one read: the page and its rows come from the same bank
        names, more = task_page(bank, page)
        return {"tasks": bank.describe(names), "has_more": more, "last_id": names[-1] if names else None}

    @app.get("/v1/tasks/{name:path}", response_model=dict, responses=ADMIN_ERRORS,
             summary="one task in detail (admin)")
    async def get_task(name: str, request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        bank = admin(request, creds).rt.bank
        if name == "upload" and name not in bank:  # GET on the POST route, not a task named "upload"
            raise ApiError(405, "method_not_allowed", "method", "/v1/tasks/upload takes POST", {"Allow": "POST"})
        if name not in bank:
            raise ApiError(404, "unknown_task", "name", str(bank.unknown(name)))
        return bank.describe([name])[0]

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
        folder = adapter_folder(options.adapter_root, body.adapter)
        change = await change_tasks(engine, task_log, {"action": "add", "name": body.name, "folder": str(folder),
                                                       "replace": body.replace})
        log.warning("task(s) %s added from %s", change["added"], body.adapter)
        return {**change, "tasks": len(engine.rt.bank)}

    @app.post("/v1/tasks/upload", response_model=TaskChange, responses=ADMIN_ERRORS,
              summary="add tasks from PEFT adapters sent in the request (admin): one transaction for all")
    async def upload_tasks(body: UploadTasksRequest, request: Request,
                           creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        engine = admin(request, creds)
        op = {"action": "upload", "items": [t.model_dump() for t in body.tasks], "replace": body.replace}
        change = await change_tasks(engine, task_log, op)
        log.warning("%d task(s) added by upload", len(change["added"]))
        return {**change, "tasks": len(engine.rt.bank)}

    @app.delete("/v1/tasks/{name:path}", response_model=TaskChange, responses=ADMIN_ERRORS,
                summary="remove a task (an MPT adapter's NAME removes NAME/0 ...); its requests in flight finish")
    async def remove_task(name: str, request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        engine = admin(request, creds)
        change = await change_tasks(engine, task_log, {"action": "remove", "name": name})
        log.warning("task(s) %s removed", change["removed"])
        return {**change, "tasks": len(engine.rt.bank)}


def adapter_folder(root: str, rel: str) -> Path:
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


def _names(op: dict) -> list[str]:
    """The task names an add or upload names, as the bank stores them (NFC)."""
    from promptmux.core.task import task_name

    return [task_name(n) for n in [op.get("name")] + [i["name"] for i in op.get("items", ())] if n]


def apply_change(engine: Engine, op: dict) -> dict[str, list[str]]:
    """Add or remove a task in this engine's bank through the Runtime's add_task / remove_task (a thread:
    reading an adapter takes a while): {"added", "replaced"} or {"removed"}. Requests in flight keep the views they
    captured. A store that cannot take the change says why: a read-only folder (409), another process's change
    holding it past the wait (503)."""
    try:
        if op["action"] == "remove":
            return {"removed": _apply_change(engine, op)}
        replaced = []  # the tasks of the same adapters, which a replace takes the place of (as the CLI says)
        if op.get("replace"):
            replaced = [n for a in dict.fromkeys(_names(op)) for n in engine.rt.bank.adapter_names(a)]
        return {"added": _apply_change(engine, op), "replaced": replaced}
    except PermissionError as e:
        raise ApiError(409, "conflict", None, str(e)) from None
    except TimeoutError as e:
        raise ApiError(503, "overloaded", None, str(e), {"Retry-After": "5"}) from None


def _apply_change(engine: Engine, op: dict) -> list[str]:
    from promptmux.core.adapters import AdapterError
    from promptmux.core.task import task_name

    persist = engine.options.persist_tasks
    served = getattr(engine, "served_name", None)
    if served and op["action"] != "remove" and task_name(served) in _names(op):  # compared as stored: NFC
        raise ApiError(409, "conflict", "name", f"{served!r} is the served model name (the base model); give the "
                                                "task another name")
    if op["action"] == "upload":
        from .uploads import read_uploads

        tasks = read_uploads(op["items"], engine.rt.hf_config)
        try:
            return engine.rt.add_tasks(tasks, persist=persist, replace=op["replace"])
        except ValueError as e:
            raise ApiError(409 if "already in the bank" in str(e) else 400,
                           "conflict" if "already in the bank" in str(e) else "invalid_request", "tasks", str(e)) from None
    if op["action"] == "remove":
        try:
            return engine.rt.remove_task(op["name"], persist=persist)
        except UnknownTaskError as e:
            raise ApiError(404, "unknown_task", "name", str(e)) from None
    root = str(Path(engine.options.adapter_root).resolve())

    def private(e: Exception) -> str:  # messages name the adapter folder without revealing the server's paths
        return str(e).replace(root, "<adapter-root>")

    try:
        return engine.rt.add_task(op["name"], op["folder"], persist=persist, replace=op["replace"], root=root)
    except AdapterError as e:
        raise ApiError(400, "invalid_request", "adapter", private(e)) from None
    except ValueError as e:
        if "already in the bank" in str(e):
            raise ApiError(409, "conflict", "name", str(e)) from None
        raise ApiError(400, "invalid_request", "adapter", private(e)) from None


_PENDING = object()


async def change_tasks(engine: Engine, task_log, op: dict) -> dict[str, list[str]]:
    """Apply op here, or with a task log append it and apply the log up to it (as every replica will)."""
    if task_log is None:
        return await asyncio.to_thread(apply_change, engine, op)
    # Replicas apply every change in the log's order, this one included: they all end with the same bank. The
    # change may be applied by this request or by the replica's follower (follow_tasks) in between: either way its
    # outcome lands in engine.waiting.
    op = dict(op, id=uuid.uuid4().hex)
    engine.waiting[op["id"]] = _PENDING
    try:
        await task_log.append(op)
        for _ in range(100):
            await sync_tasks(engine, task_log)
            outcome = engine.waiting[op["id"]]
            if outcome is not _PENDING:
                if isinstance(outcome, ApiError):
                    raise outcome
                return outcome
    finally:
        engine.waiting.pop(op["id"], None)
    raise overloaded("the task change was logged but not applied yet")


async def sync_tasks(engine: Engine, task_log) -> None:
    """Apply the log's changes this engine has not applied yet; a change a request of this replica waits for
    gets its outcome in engine.waiting."""
    async with engine.sync_lock:
        for op in await task_log.since(engine.applied):
            try:
                result = await asyncio.to_thread(apply_change, engine, op)
            except ApiError as e:  # the replica that took the request reports it; the others skip the change
                result = e
            engine.applied += 1
            if op.get("id") in engine.waiting:
                engine.waiting[op["id"]] = result


async def follow_tasks(engine: Engine, task_log, period: float = 1.0) -> None:
    """Keep this engine's bank in step with the log (changes made through other replicas)."""
    while True:
        await asyncio.sleep(period)
        try:
            await sync_tasks(engine, task_log)
        except Exception:  # the log is unreachable for a moment: try again next period
            log.exception("task log sync failed")
