"""Appending administrative events (zone edits, key operations) to the audit log.

The hash chain itself is kept by a trigger in PostgreSQL (migration 0003): every writer, the
dosage service included, gets it without doing anything."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import orjson

from schemas.timefmt import ms_to_datetime
from services.dosage.core.events import envelope, event_id


async def append_event(
    conn: asyncpg.Connection,
    kind: str,
    subject: str,
    data: dict[str, Any],
    actor: str,
    source: str,
    at_ms: int | None = None,
) -> dict[str, Any]:
    """An administrative event with who did it; its id is deterministic, so a retry of the
    same operation at the same instant is stored once."""
    at = at_ms if at_ms is not None else int(time.time() * 1000)
    body = dict(data, actor=actor)
    doc = envelope(kind, event_id(kind, subject, at, actor), source, at, subject, body)
    await conn.execute(
        "INSERT INTO audit_log (event_id, type, subject, time, event, actor) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT (event_id) DO NOTHING",
        doc["id"], kind, subject, ms_to_datetime(at), orjson.dumps(doc).decode(), actor,
    )  # fmt: skip
    return doc
