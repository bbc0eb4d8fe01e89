"""Where a consumer's partition state and next offsets live in PostgreSQL.

State is a log per partition (migration 0005): each save writes one row per partition holding
the keys that changed ({key: value, or None to delete it}), and a snapshot of every key once
the changes since the last one outgrow it. Offsets go in the same transaction, so state never
runs ahead of them or behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

# A snapshot is written when the changes saved since the last one reach this many times its
# size (and this floor). A restore reads at most about that many times the state's size; a
# snapshot exports every key, so a lower ratio costs the live service more.
SNAPSHOT_RATIO = 8
SNAPSHOT_MIN_BYTES = 1 << 20

Change = tuple[int, bool, bytes]  # partition, snapshot?, {key: value} as orjson bytes


class PartitionStateStore:
    def __init__(self, consumer: str, topic: str) -> None:
        self.consumer = consumer
        self.topic = topic
        # partition -> (bytes of its last snapshot, bytes of changes saved since)
        self._log_size: dict[int, tuple[int, float]] = {}

    async def load(
        self, conn: asyncpg.Connection, partition: int
    ) -> tuple[int | None, dict[str, Any]]:
        """The partition's next offset and state: rows of the per-key table the log replaced
        (kept until the first snapshot), then the saved changes in order."""
        key = (self.consumer, self.topic, partition)
        offset = await conn.fetchval(
            "SELECT next_offset FROM consumer_offsets "
            "WHERE consumer = $1 AND topic = $2 AND partition = $3", *key,
        )  # fmt: skip
        legacy = await conn.fetch(
            "SELECT key, value::text AS value FROM partition_state "
            "WHERE consumer = $1 AND topic = $2 AND partition = $3", *key,
        )  # fmt: skip
        state: dict[str, Any] = {r["key"]: orjson.loads(r["value"]) for r in legacy}
        # A partition with legacy rows is snapshotted on its first save, which deletes them.
        snapshot, since = 0, float("inf") if legacy else 0.0
        for r in await conn.fetch(
            "SELECT snapshot, changes FROM partition_changes "
            "WHERE consumer = $1 AND topic = $2 AND partition = $3 ORDER BY seq", *key,
        ):  # fmt: skip
            if r["snapshot"]:
                snapshot, since = len(r["changes"]), 0.0
            else:
                since += len(r["changes"])
            apply_change(state, r["snapshot"], r["changes"])
        self._log_size[partition] = (snapshot, since)
        return offset, state

    def encode(
        self, partition: int, changed: dict[str, Any], everything: Callable[[], dict[str, Any]]
    ) -> Change | None:
        """What to save for a partition now: its changed keys, or all of them (`everything`)
        once the changes since its last snapshot outgrow it; None if there is nothing."""
        snapshot, since = self._log_size.get(partition, (0, 0.0))
        full = since > max(SNAPSHOT_RATIO * snapshot, SNAPSHOT_MIN_BYTES)
        if full:
            changed = everything()
        elif not changed:
            return None
        doc = orjson.dumps(changed, option=orjson.OPT_SERIALIZE_NUMPY)  # tables of columns
        self._log_size[partition] = (len(doc), 0.0) if full else (snapshot, since + len(doc))
        return partition, full, doc

    async def write(
        self, conn: asyncpg.Connection, changes: list[Change], offsets: dict[int, int]
    ) -> None:
        """One row per partition, whatever the number of keys; a snapshot deletes what it
        makes obsolete. Call it inside the transaction that holds the rest of the save."""
        if changes:
            parts, full, docs = (list(c) for c in zip(*changes, strict=True))
            rows = await conn.fetch(
                "INSERT INTO partition_changes (consumer, topic, partition, snapshot, changes) "
                "SELECT $1, $2, p, s, c FROM unnest($3::int[], $4::bool[], $5::bytea[]) "
                "AS t(p, s, c) RETURNING partition, seq",
                self.consumer, self.topic, parts, full, docs,
            )  # fmt: skip
            seq = {r["partition"]: r["seq"] for r in rows}
            snapped = [p for p, f in zip(parts, full, strict=True) if f]
            if snapped:
                await conn.execute(
                    "DELETE FROM partition_changes c USING unnest($3::int[], $4::bigint[]) "
                    "AS t(p, s) WHERE c.consumer = $1 AND c.topic = $2 AND c.partition = t.p "
                    "AND c.seq < t.s",
                    self.consumer, self.topic, snapped, [seq[p] for p in snapped],
                )  # fmt: skip
                await conn.execute(
                    "DELETE FROM partition_state WHERE consumer = $1 AND topic = $2 "
                    "AND partition = ANY($3::int[])",
                    self.consumer, self.topic, snapped,
                )  # fmt: skip
        if offsets:
            await conn.executemany(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition) "
                "DO UPDATE SET next_offset = EXCLUDED.next_offset",
                [(self.consumer, self.topic, p, o) for p, o in offsets.items()],
            )


def apply_change(state: dict[str, Any], snapshot: bool, doc: bytes) -> None:
    """One saved change (`encode`'s doc) applied to the state read so far: a snapshot
    replaces it, a change sets its keys (None deletes one)."""
    if snapshot:
        state.clear()
    for k, value in orjson.loads(doc).items():
        if value is None:
            state.pop(k, None)
        else:
            state[k] = value
