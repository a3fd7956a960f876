"""The API's errors: ApiError, the one JSON error body every failure gets, and the app's exception handlers."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import ErrorResponse

log = logging.getLogger("promptmux.serve")

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 503, 504)}
ADMIN_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 415, 503)}


class ApiError(Exception):
    def __init__(self, status: int, type_: str, field: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.field, self.message, self.headers = status, type_, field, message, headers


def overloaded(message: str) -> ApiError:
    """503 + Retry-After: the client should come back in a second."""
    return ApiError(503, "overloaded", None, message, {"Retry-After": "1"})


def timed_out(timeout: float) -> ApiError:
    return ApiError(504, "timeout", None, f"the request took longer than {timeout:g} s")


def error_response(request_or_scope, status: int, type_: str, field: str | None, message: str,
                   headers: dict | None = None) -> JSONResponse:
    scope = request_or_scope.scope if isinstance(request_or_scope, Request) else request_or_scope
    scope.setdefault("state", {})["error_type"] = type_  # read by the metrics middleware
    if scope.get("path", "").startswith("/v2"):  # KServe v2's error body: {"error": "FIELD: message"}
        text = message if field is None or message.startswith(field) else f"{field}: {message}"
        return _AsciiJSON({"error": text}, status, headers=headers)
    return _AsciiJSON({"error": {"type": type_, "field": field, "message": message}}, status, headers=headers)


class _AsciiJSON(JSONResponse):
    """Errors may quote what a client sent (a field name with a lone surrogate): escaped, they always encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _field_of(loc) -> str | None:
    """('body', 'prompt', 'list[str]', 2) -> 'prompt[2]': the top-level field, and the item index if any; a query
    parameter by its name (('query', 'limit') -> 'limit')."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path") else list(loc)
    if not parts:
        return "body"
    name = str(parts[0])
    index = next((p for p in parts[1:] if isinstance(p, int)), None)
    return name if index is None else f"{name}[{index}]"


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app can meet (ours, validation, routing, a bug) answered as {"error": {...}}."""

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
        code = {404: ("not_found", "path"), 405: ("method_not_allowed", "method")}.get(e.status_code,
                                                                                         ("invalid_request", None))
        return error_response(request, e.status_code, code[0], code[1], str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("error serving %s", request.url.path)
        return error_response(request, 500, "internal", None, "internal error")
