"""FastAPI dependencies: the app's settings and services, and who the caller is.

Every /v1 route names the scope it needs (``require("verify")``, ``"enrol"``,
``"admin"``); ``server.auth`` checks the presented ``X-API-Key`` / ``X-Admin-Key``
against the key ring. Missing key: 401; wrong key: 403 (and, repeated, 429); a key
without the scope: 403 ``insufficient_scope``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from facegate.gallery.audit import CALLER
from facegate.server.auth import Auth, Caller
from facegate.server.errors import NotReady
from facegate.server.services import Services
from facegate.server.settings import Settings
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="client key")
_admin_key_header = APIKeyHeader(name="X-Admin-Key", auto_error=False, description="admin key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReady("the model and gallery are not loaded yet")
    return services


async def authenticate(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key_header)],
    admin_key: Annotated[str | None, Security(_admin_key_header)],
) -> Caller:
    """The caller (cached per request: a router's and a route's dependency share it)."""
    auth: Auth = request.app.state.auth
    client = request.client.host if request.client else "unknown"
    caller = auth.identify(client, api_key, admin_key)
    request.state.caller = caller.name
    CALLER.set(caller.name)  # async: set in the request's own task, seen by its gallery calls
    return caller


def require(scope: str) -> Callable[..., Caller]:
    """A dependency that lets the request through only with ``scope``."""

    async def check(request: Request, caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        request.app.state.auth.require(caller, scope)
        return caller

    check.__name__ = f"require_{scope}"
    return check


async def metrics_guard(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key_header)],
    admin_key: Annotated[str | None, Security(_admin_key_header)],
) -> None:
    """/metrics needs the metrics scope only where ``FACEGATE_METRICS_REQUIRE_KEY`` is set
    (else it stays open, even to a locked-out client: a scraper is not a guesser)."""
    if request.app.state.settings.metrics_require_key:
        request.app.state.auth.require(await authenticate(request, api_key, admin_key), "metrics")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]
