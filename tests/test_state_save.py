"""A stateful service's saves on a real PostgreSQL: each partition's changes go in as one row
per save with the next offsets, a snapshot replaces what came before it (legacy per-key rows
included), and a restore reads back exactly the state that was saved."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest

from services.common import db, stateful
from services.common.settings import CommonSettings
from services.common.stateful import StatefulService

State = dict[int, dict[str, Any]]
# Each save: (partition, key, new value or None to delete) changes, then the next offsets.
Rounds = list[tuple[list[tuple[int, str, Any]], dict[int, int]]]


class _Saver(StatefulService):
    """Only the save path: a dict per partition stands for the service's state."""

    name = "saver"

    def __init__(self, url: str) -> None:
        super().__init__(CommonSettings(database_url=url), "pings", "g", False, 1.0)
        self.state: State = {p: {} for p in (0, 1, 2)}
        self.dirty: dict[int, dict[str, Any]] = {}
        self.partitions = {p: (None, 0.0) for p in self.state}

    def change(self, partition: int, key: str, value: Any) -> None:
        if value is None:
            self.state[partition].pop(key, None)
        else:
            self.state[partition][key] = value
        self.dirty.setdefault(partition, {})[key] = value

    def restore_partition(self, partition: int, rows: dict[str, Any]) -> None: ...
    def drop_partition(self, partition: int) -> None: ...
    def partition_clock(self, partition: int) -> int | None:
        return None

    def process(self, partition: int, records: list[Any]) -> tuple[list[Any], int | None]:
        return [], None

    def tick(self, partition: int, clock: int) -> list[Any]:
        return []

    def dirty_state(self, partition: int) -> dict[str, Any]:
        return self.dirty.pop(partition, {})

    def full_state(self, partition: int) -> dict[str, Any]:
        return dict(self.state[partition])

    async def publish(self, outputs: list[Any]) -> None: ...


async def _run(url: str, rounds: Rounds) -> Any:
    """Apply each round's changes and save it with its offsets; then restore every partition
    in a fresh instance. Returns (what was held, what was restored, log rows per partition)."""
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        # Another consumer's state and a per-key row from before the log: a save must leave
        # the first alone, and fold the second in and delete it.
        await conn.execute(
            "INSERT INTO partition_state VALUES ('other', 'pings', 0, 'u1', '[\"theirs\"]'), "
            "('saver', 'pings', 2, 'old', '{\"legacy\": true}')"
        )
        saver = _Saver(url)
        for p in saver.state:  # as `assign` does
            saver.state[p] = (await saver.load_partition(conn, p))[1]
        assert saver.state[2] == {"old": {"legacy": True}}
        await saver.open_database()
        try:
            for changes, offsets in rounds:
                for p, key, value in changes:
                    saver.change(p, key, value)
                await saver.save([], offsets)
        finally:
            assert saver.pool is not None
            await saver.pool.close()
        fresh = _Saver(url)
        restored = {p: await fresh.load_partition(conn, p) for p in (0, 1, 2, 3)}
        logs = {
            r["partition"]: r["n"]
            for r in await conn.fetch(
                "SELECT partition, count(*) AS n FROM partition_changes GROUP BY partition"
            )
        }
        legacy = await conn.fetch("SELECT consumer, partition, key FROM partition_state")
        return saver.state, restored, logs, [tuple(r) for r in legacy]
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
    monkeypatch.setattr(stateful, "SNAPSHOT_MIN_BYTES", 300)
    monkeypatch.setattr(stateful, "SNAPSHOT_RATIO", 2)
    rng = random.Random(7)
    rounds = [
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
