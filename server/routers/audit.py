"""The audit trail as a resource (``GET /v1/audit``, admin scope): newest first, filtered by
identity, key, action or time, paged back with ``before``."""

from __future__ import annotations

from typing import Annotated

from facegate.server.routers.common import v1_router
from fastapi import Query, Request
from pydantic import BaseModel, Field

router = v1_router("/audit", scope="admin", tags=["audit"])


class AuditEntry(BaseModel):
    row_id: int
    at: float = Field(description="unix time the response was sent")
    key_name: str = Field(description="the key's name (never its secret); anonymous on an open "
                          "server, unauthenticated when no valid key was presented")
    request_id: str
    client: str | None = Field(description="the client's address")
    method: str
    route: str = Field(description="the route template")
    action: str = Field(description="enrol, add_templates, delete_identity, delete_template, "
                        "verify, verify_identity, search, embed, list_identities, ...")
    identity_id: str | None
    status: int
    outcome: str = Field(description="match, no_match, ok, or the error code")


class AuditPage(BaseModel):
    records: list[AuditEntry]
    next_before: int | None = Field(description="pass as `before` for the next (older) page")


@router.get("", response_model=AuditPage, summary="The audit trail (newest first)")
async def audit(
    request: Request,
    identity_id: str | None = None,
    key_name: str | None = None,
    action: str | None = None,
    since: Annotated[float | None, Query(description="unix time, inclusive")] = None,
    until: Annotated[float | None, Query(description="unix time, exclusive")] = None,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    records = await request.app.state.audit.call(
        "query", limit=limit, identity_id=identity_id, key_name=key_name, action=action,
        since=since, until=until, before=before,
    )
    entries = [AuditEntry(**r.to_dict()) for r in records]
    return AuditPage(
        records=entries, next_before=entries[-1].row_id if len(entries) == limit else None
    )
