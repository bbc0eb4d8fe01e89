"""Saving stream state with its offsets: what a save costs the service and PostgreSQL.

    .venv/bin/python bench/state_save.py [--units-per-save 1000] [--saves 200]

Each save holds the units that pinged in one commit interval (at realistic reporting
intervals, one unit per ping), spread over 4 partitions, as the geofence service saves them:
real unit states from the patrol city's tracker. Two ways to write them, on the embedded
PostgreSQL, alternately:
- `per-key upsert`: one upserted row per unit (`partition_state`, how dosewatch saved state
  until 2026-11-22), one `INSERT ... SELECT FROM unnest ... ON CONFLICT` per save;
- `log`: the services' own store (`PartitionStateStore`), one `partition_changes` row per
  partition per save and a snapshot when the changes outgrow it.
CPU is per saved unit: this process's (encoding, asyncpg) and the server's (all its processes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import columns, feed, patrol, save, table, zone_specs
from bench._stack import embedded_postgres, state_dir
from bench.pipeline import tree_cpu
from services.common import db
from services.common.statestore import PartitionStateStore
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import VisitTracker
from services.geofence.core.index import ZoneIndex

PARTITIONS = 4


def partition_of(unit_id: str) -> int:
    return zlib.crc32(unit_id.encode()) % PARTITIONS


async def _upsert(conn: asyncpg.Connection, saves: list[dict[int, dict[str, Any]]]) -> None:
    for n, rows in enumerate(saves):
        parts, keys, values = [], [], []
        for p, units in rows.items():
            for key, value in units.items():
                parts.append(p)
                keys.append(key)
                values.append(orjson.dumps(value).decode())
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO partition_state (consumer, topic, partition, key, value) "
                "SELECT 'bench', 'pings', p, k, v::jsonb "
                "FROM unnest($1::int[], $2::text[], $3::text[]) AS t(p, k, v) "
                "ON CONFLICT (consumer, topic, partition, key) "
                "DO UPDATE SET value = EXCLUDED.value",
                parts, keys, values,
            )  # fmt: skip
            await conn.executemany(
                "INSERT INTO consumer_offsets VALUES ('bench', 'pings', $1, $2) "
                "ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = $2",
                [(p, n) for p in rows],
            )


async def _log(
    conn: asyncpg.Connection, store: PartitionStateStore, everything: dict[int, dict[str, Any]],
    saves: list[dict[int, dict[str, Any]]],
) -> None:  # fmt: skip
    for n, rows in enumerate(saves):
        changes = [store.encode(p, rows[p], everything[p].copy) for p in rows]
        async with conn.transaction():
            await store.write(conn, [c for c in changes if c is not None], {p: n for p in rows})


async def measure(units_per_save: int, saves: int, rounds: int) -> list[dict[str, Any]]:
    zones = zone_specs(10_000)
    index = ZoneIndex(zones, DosageParams())
    tracker = VisitTracker(index, DosageParams())
    cols = columns(*patrol(zones, 10_000, 20))
    feed(tracker, cols, len(cols[0]))
    units = tracker.export_units(tracker.unit_ids)
    rng = random.Random(5)
    names = list(units)
    batches = []
    for _ in range(saves):
        rows: dict[int, dict[str, Any]] = {p: {} for p in range(PARTITIONS)}
        for u in rng.sample(names, units_per_save):
            rows[partition_of(u)][u] = units[u]
        batches.append(rows)
    out: dict[str, list[tuple[float, float]]] = {"per-key upsert": [], "log": []}
    async with embedded_postgres(state_dir()) as (pg, url):
        assert pg.proc is not None
        conn = await asyncpg.connect(url)
        store = PartitionStateStore("bench", "pings")
        everything: dict[int, dict[str, Any]] = {p: {} for p in range(PARTITIONS)}
        for u, state in units.items():
            everything[partition_of(u)][u] = state
        try:
            await db.migrate(conn)
            for _ in range(rounds):
                for name in out:
                    c0, s0 = time.process_time(), tree_cpu(pg.proc.pid)
                    if name == "log":
                        await _log(conn, store, everything, batches)
                    else:
                        await _upsert(conn, batches)
                    c1, s1 = time.process_time(), tree_cpu(pg.proc.pid)
                    out[name].append((c1 - c0, s1 - s0))
        finally:
            await conn.close()
    n = units_per_save * saves
    return [
        {
            "method": name,
            "units_per_save": units_per_save,
            "client_us_per_unit": min(c for c, _ in runs) / n * 1e6,
            "server_us_per_unit": min(s for _, s in runs) / n * 1e6,
        }
        for name, runs in out.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units-per-save", type=int, default=1000)
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.units_per_save, args.saves, args.rounds))
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"results: {save('state_save', rows)}")


if __name__ == "__main__":
    main()
