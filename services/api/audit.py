"""The audit log in PostgreSQL: append (hash-chained by a trigger), page by seq, verify."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from services.common.auditlog import append_event

__all__ = ["GENESIS", "ChainReport", "ChainRow", "append_event", "events_after",
           "row_hash", "verify_chain", "verify_rows"]  # fmt: skip

GENESIS = bytes(32)


@dataclass(frozen=True, slots=True)
class ChainRow:
    seq: int
    event_id: str
    body: str  # event::text, exactly as PostgreSQL renders the jsonb
    prev_hash: bytes
    hash: bytes


def row_hash(prev: bytes, seq: int, eid: str, body: str) -> bytes:
    return hashlib.sha256(prev + f"{seq}|{eid}|{body}".encode()).digest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    rows: int
    last_seq: int | None
    last_hash: str | None
    error: str | None = None
    bad_seq: int | None = None


def verify_rows(rows: list[ChainRow], prev: bytes = GENESIS) -> ChainReport:
    """Check each row's hash and its link to the one before it."""
    last: ChainRow | None = None
    for r in rows:
        if r.prev_hash != prev:
            return ChainReport(False, 0, None, None, "broken link: a row was removed, inserted "
                               "or its predecessor rewritten", r.seq)  # fmt: skip
        if row_hash(prev, r.seq, r.event_id, r.body) != r.hash:
            return ChainReport(False, 0, None, None, "hash mismatch: the row was altered", r.seq)
        prev = r.hash
        last = r
    return ChainReport(True, len(rows), last.seq if last else None,
                       last.hash.hex() if last else None)  # fmt: skip


async def verify_chain(conn: asyncpg.Connection, page: int = 5000) -> ChainReport:
    """Walk the whole log in seq order, a page at a time."""
    prev, after, total = GENESIS, 0, 0
    last_seq: int | None = None
    while True:
        records = await conn.fetch(
            "SELECT seq, event_id, event::text AS body, prev_hash, hash FROM audit_log "
            "WHERE seq > $1 ORDER BY seq LIMIT $2",
            after, page,
        )  # fmt: skip
        if not records:
            break
        rows = [ChainRow(r["seq"], r["event_id"], r["body"], bytes(r["prev_hash"] or b""),
                         bytes(r["hash"] or b"")) for r in records]  # fmt: skip
        report = verify_rows(rows, prev)
        if not report.ok:
            return report
        total += report.rows
        prev, after, last_seq = rows[-1].hash, rows[-1].seq, rows[-1].seq
    return ChainReport(True, total, last_seq, prev.hex() if last_seq is not None else None)


async def events_after(conn: asyncpg.Connection, after: int, limit: int) -> list[dict[str, Any]]:
    """Audit entries with seq > after, oldest first: {seq, hash, event}."""
    records = await conn.fetch(
        "SELECT seq, encode(hash, 'hex') AS hash, event::text AS body FROM audit_log "
        "WHERE seq > $1 ORDER BY seq LIMIT $2",
        after, limit,
    )  # fmt: skip
    return [{"seq": r["seq"], "hash": r["hash"], "event": orjson.loads(r["body"])}
            for r in records]  # fmt: skip
