"""The partition state store on a real PostgreSQL: each partition's changes go in as one row
per save with the next offsets, a snapshot replaces what came before it (legacy per-key rows
included), and a restore reads back exactly the state that was saved."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest

from services.common import db, statestore
from services.common.statestore import PartitionStateStore

PARTITIONS = (0, 1, 2)
# Each save: (partition, key, new value or None to delete) changes, then the next offsets.
Rounds = list[tuple[list[tuple[int, str, Any]], dict[int, int]]]


async def _run(url: str, rounds: Rounds) -> Any:
    """Load every partition (as a service does on assignment), apply each round's changes to a
    dict standing for the service's state and save them as the service does; then restore in
    a fresh store. Returns (what was held, what was restored, log rows per partition, the
    per-key rows left)."""
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        # Another consumer's state and a per-key row from before the log: a save must leave
        # the first alone, and fold the second in and delete it.
        await conn.execute(
            "INSERT INTO partition_state VALUES ('other', 'pings', 0, 'u1', '[\"theirs\"]'), "
            "('saver', 'pings', 2, 'old', '{\"legacy\": true}')"
        )
        store = PartitionStateStore("saver", "pings")
        held = {p: (await store.load(conn, p))[1] for p in PARTITIONS}
        assert held[2] == {"old": {"legacy": True}}
        for changes, offsets in rounds:
            dirty: dict[int, dict[str, Any]] = {}
            for p, key, value in changes:
                if value is None:
                    held[p].pop(key, None)
                else:
                    held[p][key] = value
                dirty.setdefault(p, {})[key] = value
            encoded = [store.encode(p, dirty.get(p, {}), held[p].copy) for p in PARTITIONS]
            async with conn.transaction():
                await store.write(conn, [c for c in encoded if c is not None], offsets)
        fresh = PartitionStateStore("saver", "pings")
        restored = {p: await fresh.load(conn, p) for p in (*PARTITIONS, 3)}
        logs = {
            r["partition"]: r["n"]
            for r in await conn.fetch(
                "SELECT partition, count(*) AS n FROM partition_changes GROUP BY partition"
            )
        }
        legacy = await conn.fetch("SELECT consumer, partition, key FROM partition_state")
        return held, restored, logs, [tuple(r) for r in legacy]
    finally:
        await conn.close()


def test_a_restore_reads_back_each_partition_and_its_offset(database_url: str) -> None:
    rounds: Rounds = [
        (
            [
                (0, "u1", [1, None, 2.5, "x"]),
                (0, "u2", {"a": [1, 2]}),
                (0, "", {"clock": 7}),
                (1, "u1", ["one"]),
            ],
            {0: 10, 1: 4},
        ),
        # u1 on 0 changes, u2 on 0 goes, a key that never was is deleted, 1 is untouched
        (
            [(0, "u1", [2]), (0, "u2", None), (0, "never", None), (2, "u3", 'é " \\ 😀')],
            {0: 12, 2: 1},
        ),
        ([], {1: 5}),  # offsets alone
    ]
    held, restored, logs, legacy = asyncio.run(_run(database_url, rounds))
    assert restored == {
        0: (12, {"u1": [2], "": {"clock": 7}}),
        1: (5, {"u1": ["one"]}),
        2: (1, {"old": {"legacy": True}, "u3": 'é " \\ 😀'}),
        3: (None, {}),
    }
    assert {p: state for p, (_, state) in restored.items() if p in held} == held
    # One row per partition per save that changed it. Partition 2 had legacy rows: the first
    # save wrote it a snapshot (folding them in and deleting them), the second its change.
    assert logs == {0: 2, 1: 1, 2: 2}
    assert legacy == [("other", 0, "u1")]


def test_snapshots_bound_the_log_and_keep_the_state(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statestore, "SNAPSHOT_MIN_BYTES", 300)
    monkeypatch.setattr(statestore, "SNAPSHOT_RATIO", 2)
    rng = random.Random(7)
    rounds: Rounds = [
        (
            [
                (p, f"u{rng.randrange(12)}", rng.choice([None, [k, p], {"k": k}]))
                for _ in range(5)
                for p in (0, 1)
            ],
            {0: k, 1: k},
        )
        for k in range(60)
    ]
    held, restored, logs, _ = asyncio.run(_run(database_url, rounds))
    assert {p: state for p, (_, state) in restored.items() if p in (0, 1)} == {
        p: held[p] for p in (0, 1)
    }
    assert restored[0][0] == restored[1][0] == 59
    # Without snapshots each partition would hold 60 rows: the changes since the last
    # snapshot stay under SNAPSHOT_RATIO times its size or the floor, a few saves' worth.
    assert 1 <= logs[0] < 20 and 1 <= logs[1] < 20
