"""A stateful service's save on a real PostgreSQL: the state of every partition and the next
offsets land in one transaction, a changed key is overwritten, a None value deletes its key,
and nothing of another consumer or topic is touched."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from services.common import db
from services.common.settings import CommonSettings
from services.common.stateful import StatefulService


class _Saver(StatefulService):
    """Only the save path: `dirty_state` hands out what a test queued per partition."""

    name = "saver"

    def __init__(self, url: str) -> None:
        super().__init__(CommonSettings(database_url=url), "pings", "g", False, 1.0)
        self.queued: dict[int, dict[str, Any]] = {}

    def restore_partition(self, partition: int, rows: dict[str, Any]) -> None: ...
    def drop_partition(self, partition: int) -> None: ...
    def partition_clock(self, partition: int) -> int | None:
        return None

    def process(self, partition: int, records: list[Any]) -> tuple[list[Any], int | None]:
        return [], None

    def tick(self, partition: int, clock: int) -> list[Any]:
        return []

    def dirty_state(self, partition: int) -> dict[str, Any]:
        return self.queued.pop(partition, {})

    async def publish(self, outputs: list[Any]) -> None: ...


async def _saved(url: str, rounds: list[tuple[dict[int, dict[str, Any]], dict[int, int]]]) -> Any:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        # Another consumer's row under the same key: a save must leave it alone.
        await conn.execute(
            "INSERT INTO partition_state VALUES ('other', 'pings', 0, 'u1', '[\"theirs\"]')"
        )
        saver = _Saver(url)
        await saver.open_database()
        try:
            for state, offsets in rounds:
                saver.partitions = {p: (None, 0.0) for p in (0, 1, 2)}
                saver.queued = state
                await saver.save([], offsets)
        finally:
            assert saver.pool is not None
            await saver.pool.close()
        rows = await conn.fetch(
            "SELECT consumer, partition, key, value::text AS value FROM partition_state "
            "ORDER BY consumer, partition, key"
        )
        offs = await conn.fetch(
            "SELECT partition, next_offset FROM consumer_offsets WHERE consumer = 'saver' "
            "ORDER BY partition"
        )
        return [tuple(r) for r in rows], [tuple(r) for r in offs]
    finally:
        await conn.close()


def test_saves_upsert_overwrite_and_delete_keys_per_partition(database_url: str) -> None:
    rounds: list[tuple[dict[int, dict[str, Any]], dict[int, int]]] = [
        (
            {
                0: {"u1": [1, None, 2.5, "x"], "u2": {"a": [1, 2]}, "": {"clock": 7}},
                1: {"u1": ["one"]},
            },
            {0: 10, 1: 4},
        ),
        # u1 on 0 changes, u2 on 0 goes, u1 on 1 is untouched, a key that never was is deleted
        ({0: {"u1": [2], "u2": None, "never": None}, 2: {"u3": 'é " \\ 😀'}}, {0: 12, 2: 1}),
    ]
    rows, offsets = asyncio.run(_saved(database_url, rounds))
    assert rows == [
        ("other", 0, "u1", '["theirs"]'),
        ("saver", 0, "", '{"clock": 7}'),
        ("saver", 0, "u1", "[2]"),
        ("saver", 1, "u1", '["one"]'),
        ("saver", 2, "u3", '"é \\" \\\\ 😀"'),
    ]
    assert offsets == [(0, 12), (1, 4), (2, 1)]


def test_a_save_with_no_state_still_saves_offsets(database_url: str) -> None:
    rows, offsets = asyncio.run(_saved(database_url, [({}, {1: 3})]))
    assert rows == [("other", 0, "u1", '["theirs"]')]
    assert offsets == [(1, 3)]
