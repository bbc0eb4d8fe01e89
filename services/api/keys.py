"""API keys in PostgreSQL: create, list, revoke and look up. Only a hash of a secret is kept.

A key reads `dw_<key_id>_<secret>`: the id is public (listings, logs, audit), the secret is
256 random bits shown once. Every create and revoke is written to the audit log with its
actor, in the same transaction."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from services.common.auditlog import append_event

Role = Literal["dispatcher", "mdt", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("dispatcher", "mdt", "auditor", "admin")
PREFIX = "dw"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    role: Role
    unit_id: str | None
    label: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    def public(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "role": self.role,
            "unit_id": self.unit_id,
            "label": self.label,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class KeyError_(ValueError):
    """A key request that cannot be honoured (bad role, MDT without unit, unknown id)."""


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# Exactly what create_key makes: 12 hex digits, then token_urlsafe(32) (43 characters).
_TOKEN = re.compile(r"dw_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def split_token(token: str) -> tuple[str, str] | None:
    """`dw_<key_id>_<secret>` -> (key_id, secret); None if it is not shaped like a key, so
    that arbitrary strings never reach the database or the cache."""
    m = _TOKEN.fullmatch(token)
    return (m[1], m[2]) if m else None


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        role=row["role"],
        unit_id=row["unit_id"],
        label=row["label"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        revoked_at=row["revoked_at"],
    )


async def create_key(
    conn: asyncpg.Connection, role: str, unit_id: str | None, label: str, actor: str, source: str
) -> tuple[str, KeyRecord]:
    """A new key; returns the token (shown once) and its record."""
    if role not in ROLES:
        raise KeyError_(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if (role == "mdt") != (unit_id is not None):
        raise KeyError_("an mdt key needs --unit, and only an mdt key takes one")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO api_keys (key_id, secret_hash, role, unit_id, label, created_by) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            key_id, hash_secret(secret), role, unit_id, label, actor,
        )  # fmt: skip
        record = _record(row)
        data = {"key_id": key_id, "role": role, "unit_id": unit_id, "label": label}
        await append_event(conn, "dosewatch.key.created", key_id, data, actor, source)
    return f"{PREFIX}_{key_id}_{secret}", record


async def list_keys(conn: asyncpg.Connection) -> list[KeyRecord]:
    rows = await conn.fetch("SELECT * FROM api_keys ORDER BY created_at, key_id")
    return [_record(r) for r in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: str, actor: str, source: str) -> KeyRecord:
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 "
            "RETURNING *",
            key_id,
        )
        if row is None:
            raise KeyError_(f"no key {key_id!r}")
        record = _record(row)
        data = {"key_id": key_id, "role": record.role, "unit_id": record.unit_id}
        await append_event(conn, "dosewatch.key.revoked", key_id, data, actor, source)
    return record


async def lookup(conn: asyncpg.Connection, token: str) -> KeyRecord | None:
    """The live (unrevoked) key this token is, or None."""
    parts = split_token(token)
    if parts is None:
        return None
    key_id, secret = parts
    row = await conn.fetchrow(
        "SELECT * FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL", key_id
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), hash_secret(secret)):
        return None
    return _record(row)
