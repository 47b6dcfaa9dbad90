"""FastAPI dependencies: the app's settings and services, and the two API keys.

``X-API-Key`` guards every /v1 route when ``FACEGATE_API_KEY`` is set; changing the
gallery (enrol, add templates, delete) also needs ``X-Admin-Key`` when
``FACEGATE_ADMIN_KEY`` is set. Missing key: 401; wrong key: 403.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from facegate.server.errors import MissingAPIKey, NotReady, WrongAPIKey
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


def _check(expected: str | None, given: str | None, header: str) -> None:
    if expected is None:
        return
    if not given:
        raise MissingAPIKey(f"missing {header} header")
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise WrongAPIKey(f"wrong {header}")


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    key: Annotated[str | None, Security(_api_key_header)],
) -> None:
    _check(settings.api_key, key, "X-API-Key")


def require_admin_key(
    settings: Annotated[Settings, Depends(get_settings)],
    key: Annotated[str | None, Security(_admin_key_header)],
) -> None:
    _check(settings.admin_key, key, "X-Admin-Key")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]
