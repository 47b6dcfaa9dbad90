"""The FastAPI application: ``create_app(settings)`` builds one app.

Its ``lifespan`` loads the bundle, detector, embedder and gallery once and closes them
on shutdown. The routes live in ``server.routers`` (one module per resource) and stay
thin: parsing and HTTP shape there, the work in `pipeline` (threads), `batching`
(embedder) and the gallery.

/docs (Swagger UI) and /redoc load their scripts from /static/docs, the copies that the
``fastapi-offline`` package (MIT) ships: Swagger UI (Apache-2.0) and ReDoc (MIT). They
work with no network, where FastAPI's defaults fetch them from a CDN.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from facegate.server import schemas
from facegate.server.audit import AuditMiddleware, AuditTrail
from facegate.server.auth import Auth
from facegate.server.deps import get_services
from facegate.server.errors import install_error_handlers
from facegate.server.faults import install_fault_handlers
from facegate.server.metrics import ServerMetrics
from facegate.server.middleware import (
    BodyGuardMiddleware,
    EnvelopeCORSMiddleware,
    RequestContextMiddleware,
)
from facegate.server.retention import retention_loop
from facegate.server.routers import include_routers
from facegate.server.services import start_services, stop_services
from facegate.server.settings import Settings
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from facegate import __version__


def create_app(settings: Settings | None = None) -> FastAPI:
    """One app for ``settings`` (read from ``FACEGATE_*`` when omitted)."""
    settings = settings or Settings()
    metrics = ServerMetrics(identity_ids=settings.metrics_identity_ids)
    audit = AuditTrail(settings.gallery, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await start_services(settings, metrics)
        await audit.open()  # after the gallery, which creates the audit table
        app.state.services = services
        retention = asyncio.create_task(retention_loop(settings, services.gallery, audit, metrics))
        try:
            yield
        finally:
            app.state.services = None
            retention.cancel()
            await audit.close()
            await stop_services(services)

    app = FastAPIOffline(
        static_url="/static/docs",
        title="facegate",
        version=__version__,
        summary="Face verification: 1:1 verify, enrol, 1:N search, consistency monitoring",
        lifespan=lifespan,
        responses={413: {"model": schemas.ErrorResponse, "description": "request too large"}},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = Auth(settings, metrics)
    app.state.audit = audit
    app.state.services = None
    install_error_handlers(app)
    install_fault_handlers(app, metrics)  # 507 storage_full, 503 resources_exhausted
    include_routers(app)

    if settings.cors_origins:
        app.add_middleware(
            EnvelopeCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "X-Admin-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(AuditMiddleware, trail=audit)  # innermost: sees the route and caller
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.max_request_bytes,
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


__all__ = ["create_app", "get_services"]
