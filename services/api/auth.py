"""Who is calling: API keys (PostgreSQL) or bearer JWTs, mapped to a role.

HTTP: `Authorization: Bearer <key or JWT>` or `X-API-Key: <key>`. Websockets also accept
`?token=` because browsers cannot set headers on a WebSocket. No credential -> 401 (close
4401); a role the endpoint does not admit -> 403 (close 4403)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
from fastapi import HTTPException, Request, WebSocket

from services.api import keys
from services.api.keys import ROLES, Role
from services.api.settings import ApiSettings


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    subject: str  # key id, or the JWT's sub
    unit_id: str | None = None  # MDTs only: the one unit they may ask about

    def may(self, *roles: Role) -> bool:
        return self.role == "admin" or self.role in roles


class AuthError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Authenticator:
    def __init__(self, settings: ApiSettings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self._cache: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._jwks = jwt.PyJWKClient(settings.jwks_url) if settings.jwks_url else None

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AuthError(401, "missing credential: send 'Authorization: Bearer <key>'")
        if keys.split_token(token) is not None:
            principal = await self._key(token)
        elif token.count(".") == 2 and (self.settings.jwt_secret or self._jwks):
            principal = await self._jwt(token)
        else:
            principal = None
        if principal is None:
            raise AuthError(401, "invalid or revoked credential")
        return principal

    async def _key(self, token: str) -> Principal | None:
        now = time.monotonic()
        # Keyed by a digest (fixed size), holding only keys that exist: guessed tokens cost a
        # lookup each, never memory, and never push a real key out.
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.settings.key_cache_s:
            self._cache.move_to_end(digest)
            return hit[1]
        async with self.pool.acquire() as conn:
            record = await keys.lookup(conn, token)
        if record is None:
            self._cache.pop(digest, None)
            return None
        principal = Principal(record.role, record.key_id, record.unit_id)
        self._cache[digest] = (now, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > 10_000:
            self._cache.popitem(last=False)
        return principal

    async def _jwt(self, token: str) -> Principal | None:
        s = self.settings
        try:
            if self._jwks is not None:
                jwks = self._jwks
                key: Any = (await asyncio.to_thread(jwks.get_signing_key_from_jwt, token)).key
                algorithms = ["RS256", "ES256", "PS256"]
            else:
                assert s.jwt_secret is not None
                key, algorithms = s.jwt_secret.get_secret_value(), ["HS256"]
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=s.jwt_audience, issuer=s.jwt_issuer,
                options={"require": ["exp", "sub"], "verify_aud": s.jwt_audience is not None},
            )  # fmt: skip
        except (jwt.PyJWTError, ValueError):
            return None
        role = claims.get(s.jwt_role_claim)
        unit = claims.get(s.jwt_unit_claim)
        # Identity providers may put a unit on every user: it only binds an MDT.
        if role not in ROLES or (role == "mdt" and not isinstance(unit, str)):
            return None
        return Principal(role, str(claims["sub"]), unit if role == "mdt" else None)


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def token_of(request: Request) -> str | None:
    return _bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")


def ws_token_of(ws: WebSocket) -> str | None:
    return (
        _bearer(ws.headers.get("authorization"))
        or ws.headers.get("x-api-key")
        or ws.query_params.get("token")
    )


def require(principal: Principal, *roles: Role) -> None:
    """403 unless the principal has one of these roles (admin has every role)."""
    if not principal.may(*roles):
        raise HTTPException(403, f"role {principal.role!r} may not use this endpoint")
