"""The audit log for auditors: GET /v1/audit/events (paged by seq) and /v1/audit/verify.

seq is assigned in commit order (migration 0003), so a reader that resumes after the last seq
it saw never misses a row that committed late, and never sees one twice."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from services.api.audit import events_after, verify_chain
from services.api.auth import Principal, require
from services.api.context import Caller, Ctx

router = APIRouter(prefix="/v1", tags=["audit"])

DEFAULT_PAGE = 100
MAX_SEQ = 2**63 - 1  # bigint: anything larger cannot be a seq


async def auditor(caller: Caller) -> Principal:
    # A dependency, so a refused role gets 403 before any 422 about its parameters.
    require(caller, "auditor")
    return caller


Auditor = Annotated[Principal, Depends(auditor)]


class AuditEntry(BaseModel):
    seq: int
    hash: str
    event: dict[str, Any]


class AuditPage(BaseModel):
    events: list[AuditEntry]
    next_after: int
    has_more: bool


class ChainReportOut(BaseModel):
    ok: bool
    rows: int
    last_seq: int | None
    last_hash: str | None
    error: str | None
    bad_seq: int | None


@router.get(
    "/audit/events",
    summary="Audit entries after a seq, oldest first",
    response_model=None,
    responses={200: {"model": AuditPage}},
)
async def audit_events(
    ctx: Ctx,
    _: Auditor,
    after: Annotated[
        int, Query(ge=0, le=MAX_SEQ, description="the next_after of the previous page; 0 first")
    ] = 0,
    limit: Annotated[int | None, Query(ge=1, description="at most the server's max_page")] = None,
) -> dict[str, Any]:
    n = min(limit or DEFAULT_PAGE, ctx.settings.max_page)
    async with ctx.pool.acquire() as conn:
        events = await events_after(conn, after, n + 1)  # one more: is there a next page?
    more = len(events) > n
    events = events[:n]
    # Unchanged when nothing is new, so a follower can poll with it as is.
    next_after = events[-1]["seq"] if events else after
    return {"events": events, "next_after": next_after, "has_more": more}


@router.get(
    "/audit/verify",
    summary="Recompute the audit hash chain",
    description="200 either way: a broken chain (ok=false, with the first bad seq) is a finding "
    "about the data, not a failure of the request.",
    response_model=ChainReportOut,
)
async def audit_verify(ctx: Ctx, _: Auditor) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn:
        report = await verify_chain(conn)
    return dataclasses.asdict(report)
