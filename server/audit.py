"""The audit trail of every /v1 request: who (the key's name), when, the request id, the
action, the identity and the outcome (``gallery.audit`` stores it beside the gallery).

A pure ASGI middleware sees each request's route, path parameters, caller (left in the
request state by ``server.auth``) and response, so the routes stay as they are: the
identity comes from the path, or from the JSON response (enrolment's new id, the
identity verified, search's match), and the outcome is ``match``/``no_match``, ``ok``
or the error code. Records are written after the response is sent, batched (one
transaction for whatever queued while the previous batch was written), so the trail
costs a request no latency; a write that fails (disk full, database down) is counted in
``facegate_audit_write_failures_total`` and logged at most once a minute, never fatal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from facegate.gallery.audit import AuditRecord, open_audit
from facegate.server.metrics import ServerMetrics
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("facegate.server")
MAX_PENDING = 10_000  # records waiting for the database; past it they are counted and dropped
BODY_PEEK_BYTES = 65_536
ACTIONS = {
    ("POST", "/v1/identities"): "enrol",
    ("POST", "/v1/identities/{identity_id}/templates"): "add_templates",
    ("DELETE", "/v1/identities/{identity_id}"): "delete_identity",
    ("DELETE", "/v1/identities/{identity_id}/templates/{template_id}"): "delete_template",
    ("GET", "/v1/identities"): "list_identities",
    ("GET", "/v1/identities/{identity_id}"): "read_identity",
    ("POST", "/v1/verify"): "verify",
    ("POST", "/v1/verify/identity"): "verify_identity",
    ("POST", "/v1/search"): "search",
    ("POST", "/v1/embed"): "embed",
    ("GET", "/v1/audit"): "read_audit",
}


class AuditTrail:
    """Queues records and writes them in batches on a thread of its own."""

    def __init__(self, location: str | Path, metrics: ServerMetrics) -> None:
        self.location = location
        self.metrics = metrics
        self._store: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._pending: list[AuditRecord] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._last_logged = 0.0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._executor, open_audit, self.location)

    def record(self, record: AuditRecord) -> None:
        if self._store is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self.metrics.audit_failures.labels("dropped").inc()
            return
        self._pending.append(record)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write everything queued so far (a read of the trail flushes first)."""
        async with self._lock:
            while self._pending and self._store is not None:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._store.append, batch
                    )
                except Exception as e:  # disk full, database down: counted, never fatal
                    self.metrics.audit_failures.labels("write").inc(len(batch))
                    if time.monotonic() - self._last_logged > 60:
                        self._last_logged = time.monotonic()
                        log.error("audit records not written (%d lost): %s", len(batch), e)

    async def call(self, fn: str, **kwargs: Any) -> Any:
        await self.flush()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: getattr(self._store, fn)(**kwargs))

    async def close(self) -> None:
        await self.flush()
        if self._store is not None:
            store, self._store = self._store, None
            await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
        self._executor.shutdown(wait=True)


def _outcome(method: str, route: str, status: int, body: Any) -> tuple[str, str | None]:
    """(outcome, identity id) from the response: the error code, match/no_match, or ok."""
    if not isinstance(body, dict):
        return ("ok" if status < 400 else f"http_{status}"), None
    if status >= 400:
        error = body.get("error")
        return (error.get("code") if isinstance(error, dict) else f"http_{status}"), None
    identity = body.get("identity")
    identity_id = identity.get("identity_id") if isinstance(identity, dict) else body.get("identity_id")
    match = body.get("match", "absent")
    if isinstance(match, dict):
        return "match", match.get("identity_id")
    if match is None or match is False:
        return "no_match", identity_id
    if match is True:
        return "match", identity_id
    return "ok", identity_id


class AuditMiddleware:
    """Records every /v1 request in the trail once its response has been sent."""

    def __init__(self, app: ASGIApp, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status, is_json, chunks, size = 500, False, [], 0

        async def peek(message: Message) -> None:
            nonlocal status, is_json, size
            if message["type"] == "http.response.start":
                status = message["status"]
                is_json = "json" in Headers(raw=message.get("headers", [])).get("content-type", "")
            elif message["type"] == "http.response.body" and is_json and size < BODY_PEEK_BYTES:
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
            await send(message)

        try:
            await self.app(scope, receive, peek)
        finally:
            self._record(scope, status, b"".join(chunks) if size <= BODY_PEEK_BYTES else b"")

    def _record(self, scope: Scope, status: int, raw: bytes) -> None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        state = scope.get("state", {})
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"]
        outcome, found = _outcome(method, route, status, body)
        identity_id = scope.get("path_params", {}).get("identity_id") or found
        client = scope.get("client")
        self.trail.record(AuditRecord(
            at=time.time(),
            key_name=state.get("caller", "unauthenticated"),
            request_id=state.get("request_id", ""),
            client=client[0] if client else None,
            method=method,
            route=route,
            action=ACTIONS.get((method, route), "other"),
            identity_id=None if identity_id is None else str(identity_id)[:128],
            status=status,
            outcome=str(outcome)[:64],
        ))
