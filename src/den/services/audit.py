"""The audit log: who did what to which object, when, and how it ended."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select

from den.db.models import AuditEvent
from den.rpc.registry import Cli, Context, Params, Right, method
from den.services.common import parse_when


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    via: str
    method: str
    target: str
    params: dict[str, Any]
    outcome: str
    error: str
    duration_ms: float


class AuditList(Params):
    actor: str | None = Field(None, max_length=64, description="Only calls by this actor.")
    target: str | None = Field(
        None, max_length=200, description="Only this target (user:NAME, ...)."
    )
    method: str | None = Field(
        None, max_length=64, description="Only this method (user.create, ...)."
    )
    outcome: str | None = Field(
        None, max_length=32, description="Only this outcome (ok, not_found, ...)."
    )
    since: str | None = Field(
        None, max_length=64, description="Only after this: 1h, 2d or ISO 8601."
    )
    limit: int = Field(100, ge=1, le=10000, description="At most this many events, newest first.")


@method(
    "audit.list",
    right=Right.read,
    cli=Cli(
        "audit", columns=("id", "at", "actor", "via", "method", "target", "outcome", "duration_ms")
    ),
)
async def audit_list(ctx: Context, p: AuditList) -> list[AuditOut]:
    """List audit events, newest first: all for admins, your own calls for members."""
    q = select(AuditEvent)
    actor = p.actor
    if not ctx.caller.is_admin:
        if actor is not None and actor != ctx.caller.name:
            return []
        actor = ctx.caller.name
    if actor is not None:
        q = q.where(AuditEvent.actor == actor)
    if p.target is not None:
        q = q.where(AuditEvent.target == p.target)
    if p.method is not None:
        q = q.where(AuditEvent.method == p.method)
    if p.outcome is not None:
        q = q.where(AuditEvent.outcome == p.outcome)
    if p.since is not None:
        q = q.where(AuditEvent.at >= parse_when(p.since, field="since", future=False))
    rows = (await ctx.db.execute(q.order_by(AuditEvent.id.desc()).limit(p.limit))).scalars()
    return [
        AuditOut(
            id=e.id,
            at=e.at,
            actor=e.actor,
            via=e.via,
            method=e.method,
            target=e.target,
            params=e.params,
            outcome=e.outcome,
            error=e.error,
            duration_ms=e.duration_ms,
        )
        for e in rows
    ]
