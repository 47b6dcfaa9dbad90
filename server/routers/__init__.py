"""One router module per resource: verify (1:1), identities (the gallery), search (1:N),
embed (embeddings), audit (the audit trail), monitoring (consistency, health, readiness,
metrics), and console (the operator's web page at /console, which calls the /v1 routes
from the browser)."""

from __future__ import annotations

from facegate.server.routers import (
    audit,
    console,
    embed,
    identities,
    monitoring,
    search,
    verify,
)
from fastapi import FastAPI


def include_routers(app: FastAPI) -> None:
    """Every route: the /v1 ones (behind the API key) and the probes."""
    for module in (verify, identities, search, embed, monitoring, audit):
        app.include_router(module.router)
    app.include_router(monitoring.probes)
    app.include_router(console.router)


__all__ = ["include_routers"]
