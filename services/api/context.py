"""What every route needs, and the FastAPI dependencies that hand it out."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, HTTPException, Request, Response

from services.api.auth import Authenticator, AuthError, Principal, require, token_of
from services.api.core.statusbook import StatusBook
from services.api.keys import Role
from services.api.settings import ApiSettings


@dataclass(slots=True)
class ZoneInfo:
    """What status filters and the MDT view need of a zone, loaded from PostgreSQL."""

    zone_id: str
    name: str | None
    district: str | None
    bbox: tuple[float, float, float, float]  # min lon, min lat, max lon, max lat
    feature: dict[str, Any]


@dataclass(slots=True)
class Fix:
    lat: float
    lon: float
    ts: str
    received: float  # wall time it was seen


@dataclass(slots=True)
class ApiContext:
    settings: ApiSettings
    pool: asyncpg.Pool
    auth: Authenticator
    book: StatusBook
    zones: dict[str, ZoneInfo] = field(default_factory=dict)
    fixes: dict[str, Fix] = field(default_factory=dict)
    # Set on every status applied; the websocket hub ticks on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Derived from `zones` and rebuilt when that dict is replaced (see routes_units).
    places: tuple[dict[str, ZoneInfo], Any] | None = None

    def take_token(self, who: str) -> bool:
        """Token bucket per credential for polling endpoints: False when over the limit."""
        s = self.settings
        now = time.monotonic()
        tokens, at = self.buckets.get(who, (float(s.poll_burst), now))
        tokens = min(float(s.poll_burst), tokens + (now - at) * s.poll_rate_per_s)
        if tokens < 1.0:
            self.buckets[who] = (tokens, now)
            return False
        if len(self.buckets) > 100_000:
            self.buckets.clear()
        self.buckets[who] = (tokens - 1.0, now)
        return True


def cached_json(body: bytes, if_none_match: str | None) -> Response:
    """JSON with a content ETag; 304 with no body when the client already holds it."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def get_ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(get_ctx)]


async def get_principal(request: Request, ctx: Ctx) -> Principal:
    try:
        return await ctx.auth.authenticate(token_of(request))
    except AuthError as exc:
        raise HTTPException(exc.status, exc.detail,
                            headers={"WWW-Authenticate": "Bearer"}) from None  # fmt: skip


Caller = Annotated[Principal, Depends(get_principal)]


def allow_poll(ctx: ApiContext, principal: Principal, *roles: Role) -> None:
    """For endpoints MDTs poll: the role first (403), then the rate (429 with Retry-After)."""
    require(principal, *roles)
    if not ctx.take_token(principal.subject):
        retry = max(1, round(1 / ctx.settings.poll_rate_per_s))
        raise HTTPException(429, "polling too fast", headers={"Retry-After": str(retry)})
