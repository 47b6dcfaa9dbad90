"""uvicorn's h11 protocol with a deadline on request headers (slowloris).

uvicorn closes idle keep-alive connections but sets no limit on how long a request line
and its headers may take: a client that sends one header byte every few seconds holds a
connection (and a socket) for ever, and a few hundred such clients starve the server.
Here a request's headers must be complete within ``header_timeout_s`` of the connection
opening or of the previous response ending; otherwise the connection is closed, with a
408 JSON envelope when part of a request had arrived. Body deadlines are the ASGI
middleware's job (``middleware.BodyGuardMiddleware``), where the JSON reply is easy.

The protocol also keeps uvicorn's cap on open connections plus requests in progress
(``limit_concurrency``, ``FACEGATE_MAX_CONNECTIONS``), but answers a request over it with
the envelope (503 ``too_many_connections``, ``Retry-After``, the connection closed)
instead of uvicorn's plain text, and logs the refusals at most once a minute instead of
once each: a flood of connections degrades to refusals, not to a flood of log lines.

It also answers uvicorn's "invalid HTTP request" 400 (oversized or malformed
headers) with the envelope instead of plain text. After such an answer it closes its
side for writing and reads (and drops) what the client still sends for up to
``LINGER_S`` before closing: closing at once, with a 200 KB header still arriving, makes
the kernel answer with a TCP reset that destroys the 400 before the client reads it.

:class:`BoundedShutdownServer` is uvicorn's server with an upper bound on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from typing import Any

import h11
import uvicorn
from facegate.server.errors import error_body
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

LINGER_S = 2.0
SHUTDOWN_MARGIN_S = 3.0
REFUSAL_LOG_EVERY_S = 60.0
log = logging.getLogger("facegate.server")


class HeaderTimeoutH11Protocol(H11Protocol):
    """``H11Protocol`` plus the header deadline; see :func:`h11_protocol`."""

    header_timeout_s: float = 10.0

    _refused = 0  # requests over the connection cap since the last log line (all connections)
    _refusal_logged = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check would answer in plain text: the cap is checked in _capped_app.
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None
        self._inner_app, self.app = self.app, self._capped_app
        self._header_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object = None  # the cycle current when the timer was armed
        self._bytes_since_armed = False
        self._lingering = False  # answered and half-closed: what still arrives is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._bytes_since_armed = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        # A new cycle means h11 parsed a whole request head: its deadline is met.
        if self.cycle is not self._timed_cycle or self.transport.is_closing():
            self._cancel_header_timer()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_header_timer()  # the transport now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        # The next request on this keep-alive connection gets its own deadline; a
        # pipelined one already buffered is parsed (and the timer cancelled) right away.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    async def _capped_app(self, scope: Any, receive: Any, send: Any) -> None:
        """uvicorn's limit_concurrency test (this request's task already counted)."""
        cap = self.connection_cap
        if cap is None or scope["type"] != "http" or (
            len(self.connections) < cap and len(self.tasks) <= cap
        ):
            await self._inner_app(scope, receive, send)
            return
        cls = HeaderTimeoutH11Protocol
        cls._refused += 1
        now = self.loop.time()
        if now - cls._refusal_logged >= REFUSAL_LOG_EVERY_S:
            self.logger.warning("over FACEGATE_MAX_CONNECTIONS (%d): %d requests answered 503 "
                                "(logged at most once a minute)", cap, cls._refused)
            cls._refused, cls._refusal_logged = 0, now
        body = json.dumps(error_body(
            "too_many_connections", f"the server holds its maximum of {cap} connections and "
            "requests in progress; retry shortly")).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def send_400_response(self, msg: str) -> None:
        self._send_error_and_close(400, "bad_request", "invalid HTTP request")

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._timed_cycle = self.cycle
        self._bytes_since_armed = False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._bytes_since_armed and self.conn.our_state is h11.IDLE:
            # uvicorn's own logger, so it shows at `facegate serve --log-level info`
            self.logger.info("%s - request headers not complete within %g s: 408, closing",
                             self._peer(), self.header_timeout_s)
            message = f"request headers not received within {self.header_timeout_s:g} s"
            self._send_error_and_close(408, "request_timeout", message)
        else:  # an idle connection, or the rest of a request already answered
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _send_error_and_close(self, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self._cancel_header_timer()
        self._lingering = True
        self.transport.write_eof()  # the answer, then EOF; the rest of the request is read
        self.loop.call_later(LINGER_S, self.transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"


def h11_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this header deadline."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s}
    )


class BoundedShutdownServer(uvicorn.Server):
    """uvicorn's server, whose process is gone at most ``SHUTDOWN_MARGIN_S`` after the
    graceful timeout: requests still running then are answered 503 ``shutting_down``
    (middleware), and past the margin whatever still holds the process (a thread in a
    long call) no longer does. Everything acknowledged is committed by then."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            bound = (self.config.timeout_graceful_shutdown or 0) + SHUTDOWN_MARGIN_S
            timer = threading.Timer(bound, _exit_now, args=(bound,))
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def _exit_now(bound: float) -> None:
    log.error("shutdown still not done %g s after the signal: exiting now", bound)
    logging.shutdown()
    os._exit(1)
