"""ASGI middleware: the request body cap (413) and decompression, and the per-response metrics and worker tag."""

from __future__ import annotations

import os
import socket
import time
import zlib

from .api_errors import error_response
from .metrics import Metrics

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or as a chunked body arrives (nothing larger is ever
    buffered); a gzip or deflate body (Content-Encoding) is decompressed under the same cap; the body is then
    replayed to the app, and later receive() calls (disconnect) pass through."""

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
        encoding = dict(scope["headers"]).get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            body, refused = self._decoded(encoding, body)
            if refused:
                return await error_response(scope, *refused)(scope, receive, send)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k not in (b"content-encoding", b"content-length")]
                                         + [(b"content-length", str(len(body)).encode())]}
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        if chunks and chunks[-1]["type"] != "http.request":
            replay.append(chunks[-1])

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return await self.app(scope, replayed, send)


    def _decoded(self, encoding: bytes, body: bytes):
        """(the body decompressed, None) or (b"", the error's arguments). gzip and deflate (tritonclient's
        request_compression_algorithm) are read; what they unpack to obeys the same limit as a plain body."""
        if encoding not in (b"gzip", b"x-gzip", b"deflate"):
            return b"", (415, "unsupported_media_type", "content-encoding",
                         f"Content-Encoding {encoding.decode('latin-1')!r} is not read; send gzip, deflate or none")
        plain, rest = b"", body
        # HTTP's deflate is zlib-framed (RFC 9110), but some clients send the bare stream (RFC 1951): read both
        raw = encoding == b"deflate" and not _zlib_framed(body)
        while rest:  # gzip allows several members one after the other (RFC 1952); anything else after is an error
            unpack = zlib.decompressobj(-zlib.MAX_WBITS if raw else 32 + zlib.MAX_WBITS)  # gzip/zlib: by the header
            try:
                plain += unpack.decompress(rest, self.limit + 1 - len(plain))
            except zlib.error as e:
                if encoding == b"deflate" and not raw and not plain:  # a bare stream whose first bytes pass the check
                    raw, rest = True, body
                    continue
                return b"", (400, "invalid_request", "body", f"the {encoding.decode()} body does not decompress ({e})")
            if len(plain) > self.limit or unpack.unconsumed_tail:
                return b"", (413, "too_large", "body", f"request body over {self.limit} bytes once decompressed")
            if not unpack.eof:
                return b"", (400, "invalid_request", "body", f"the {encoding.decode()} body is cut short")
            rest = unpack.unused_data
            if raw and rest:
                return b"", (400, "invalid_request", "body", "the deflate body has data after its end")
        return plain, None


def _zlib_framed(body: bytes) -> bool:
    """Whether body starts with a zlib header (RFC 1950: method 8, header check a multiple of 31)."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


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
