"""Pure ASGI middleware: request ids, request metrics, request body limits, CORS.

Pure ASGI (not ``BaseHTTPMiddleware``) so uploads stream through untouched and the
limits can answer 413 before a large body is read, or 408 when it stalls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from facegate.server.errors import error_body, error_response
from facegate.server.fair import CLIENT
from facegate.server.metrics import ServerMetrics
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("facegate.server")
REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_for(client_value: str | None) -> str:
    """Echo a sane client id, or make one (a client id is never trusted blindly)."""
    if client_value and _CLIENT_ID.match(client_value):
        return client_value
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Sets ``x-request-id`` on every response and counts requests by route template.

    It is also the last line for unexpected exceptions: they are logged and answered
    with the JSON envelope (500), still carrying the request id; and for shutdown: a
    request still running when uvicorn's graceful timeout ends is cancelled, and
    answered 503 ``shutting_down`` instead of uvicorn's plain-text 500.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_for(headers.get(REQUEST_ID_HEADER))
        # Where the request comes from, for the face workers' turns (server.fair).
        CLIENT.set((scope.get("client") or ("?",))[0])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if started:
                raise
            log.warning("request %s cut by shutdown: 503 shutting_down", request_id)
            response = error_response(503, "shutting_down", "the server is shutting down; "
                                      "nothing of this request was acknowledged, retry it")
            response.headers["connection"] = "close"
            await response(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error (request %s)", request_id)
            if started:
                raise
            response = error_response(500, "internal_error", "internal server error")
            await response(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                scope["method"], template, status, time.perf_counter() - start
            )


class BodyGuardMiddleware:
    """Bound every request body: 413 past ``max_bytes``, 408 when it is not all there
    ``timeout_s`` after the app starts reading it.

    A declared ``Content-Length`` over the limit is refused before reading; a streamed
    body is counted as it arrives. A stalled or trickling upload would otherwise hold a
    connection and a worker for ever. On either refusal the app's own response (it sees
    an exception from ``receive``) is replaced by the JSON envelope with
    ``Connection: close``, so the unread rest of the body is never waited for.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, *self._too_large())
            return
        received = 0
        deadline: float | None = None
        body_done = False
        refusal: tuple[int, str, str] | None = None

        async def guarded_receive() -> Message:
            nonlocal received, deadline, body_done, refusal
            if body_done:  # later calls wait for the disconnect: no deadline on that
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                refusal = (408, "request_timeout",
                           f"request body not received within {self.timeout_s:g} s")
                raise _BodyRefused from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = self._too_large()
                    raise _BodyRefused
            return message

        async def guarded_send(message: Message) -> None:
            if refusal is None:
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None:
            await _refuse(send, *refusal)

    def _too_large(self) -> tuple[int, str, str]:
        return 413, "request_too_large", f"request body exceeds {self.max_bytes} bytes"


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    """The envelope, then close: the client may still be sending the refused body."""
    body = json.dumps(error_body(code, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyRefused(Exception):
    """Raised inside the app's receive; the middleware turns it into the 408 or 413."""


class EnvelopeCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered by the JSON envelope
    (``cors_rejected``) instead of plain text, like every other error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {
            k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
        }
        message = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        return JSONResponse(error_body("cors_rejected", message), status_code=400, headers=headers)
