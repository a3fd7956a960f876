"""serve(): the app under uvicorn, with uvicorn's HTTP/1.1 protocol (httptools) given the limits it lacks.

Limits against slow and abusive clients:

- Headers: the whole request head must arrive within `header_timeout` seconds of the connection opening (or of
  the previous response), else 408 and the connection is closed (slowloris: one byte every few seconds
  would otherwise hold a connection forever). At most `max_header_bytes` of request line and headers: 431.
- Body: once the headers are in, the body must arrive within `body_timeout` seconds, else 408 and close.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import create_app
from .options import ServeOptions

STATUS = {408: b"408 Request Timeout", 431: b"431 Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    pass


class GuardedHttpTools(HttpToolsProtocol):
    header_timeout = 10.0
    body_timeout = 30.0
    max_header_bytes = 64 * 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._guard = None
        self._await_head()

    def _await_head(self) -> None:
        self._reading_head, self._head_bytes, self._head_size, self._head_too_large = True, 0, 0, False
        self._arm(self.header_timeout, "the request headers did not arrive in time")

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._guard = self.loop.call_later(seconds, self._refuse, 408, why)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _refuse(self, status: int, why: str) -> None:
        """Answer status (unless a response has started) and close the connection."""
        self._guard = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            body = why.encode()
            self.transport.write(b"HTTP/1.1 " + STATUS[status] + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                                 + body)
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's receive() says http.disconnect; its work is dropped
            self.cycle.message_event.set()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_bytes += len(data)  # httptools buffers a header until it ends: bound what it may hold
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.max_header_bytes:
            self._refuse(431, f"request headers over {self.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            return self._refuse(431, f"request headers over {self.max_header_bytes} bytes")
        super().send_400_response(msg)

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head arrived in one read: count it exactly (the read may also hold the body).
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLarge()
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        self._head_size = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._arm(self.body_timeout, "the request body did not arrive in time")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request read while this one ran starts now: its head came already
        super().on_response_complete()
        if not self.transport.is_closing() and not pipelined:
            self._await_head()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float, body_timeout: float, max_header_bytes: int) -> type:
    """The protocol class for uvicorn.Config(http=...) with these limits."""
    return type("PromptmuxHttp", (GuardedHttpTools,), {"header_timeout": header_timeout, "body_timeout": body_timeout,
                                                       "max_header_bytes": max_header_bytes})


def serve(deploy_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          log_level: str = "warning") -> None:
    """Run the server until SIGTERM / SIGINT, which drain: no new connections, in-flight requests finish (up
    to options.drain_timeout), then the worker stops."""
    options = options or ServeOptions()
    if options.grpc_port is not None:
        options.grpc_host = host
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:  # before the engine loads (seconds to minutes): a port in use fails at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bound here so that --port 0 can report the port it got
    except (OSError, OverflowError) as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); choose another "
                         "--port (0: any free one) or --host") from None
    bound = sock.getsockname()[1]
    app = create_app(deploy_dir, options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # /ready says 503 at once; requests in flight go on
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                grpc = app.state.grpc_port
                print(json.dumps({"serving": f"http://{host}:{bound}", "pid": os.getpid(),
                                  **({"grpc": f"{host}:{grpc}"} if grpc is not None else {})}), flush=True)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=options.drain_timeout,
                            access_log=False, timeout_keep_alive=5,
                            http=guarded_protocol(options.header_timeout, options.body_timeout,
                                                  options.max_header_bytes))
    Server(config).run(sockets=[sock])
