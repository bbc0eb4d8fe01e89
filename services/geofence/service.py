"""The geofence service: pings (keyed by unit) -> visit events (keyed by zone).

Each assigned partition has its own tracker and stream clock: the newest ping time on that
partition plus the wall time since it last delivered, so a dark MDT's visit closes while a
fast backfill does not close visits early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
import orjson

from schemas.fastping import FastPings, PingColumns
from schemas.timefmt import parse_ts
from services.common import db, kafka
from services.common.fetched import FetchedRecord
from services.common.http import HttpServer, probe_app
from services.common.metrics import EVENTS_OUT, LATENCY, OPEN_VISITS, PINGS_IN
from services.common.moving import run_stage
from services.common.settings import CommonSettings
from services.common.stateful import StatefulService
from services.common.zonestore import CHANNEL, load_zones
from services.dosage.core.events import visit_cloudevent, visit_records, zone_changed_cloudevent
from services.dosage.core.tracker import VisitEvent, VisitTracker, units_of_table
from services.dosage.core.warmup import warm_up
from services.geofence.core.index import ZoneIndex

log = logging.getLogger(__name__)
META = ""  # the partition's own state row
# A save's changed units, as one table (`VisitTracker.export_table`), under TABLE + its number:
# no unit id holds a "#".
TABLE = "#units "
Record = tuple[bytes, bytes]  # a visits-topic record: its key and value


class GeofenceSettings(CommonSettings):
    group_id: str = "dosewatch-geofence"
    wall_clock: bool = True
    tick_s: float = 0.5
    source: str = "urn:dosewatch:geofence"


class GeofenceService(StatefulService):
    name = "geofence"

    def __init__(self, settings: GeofenceSettings) -> None:
        super().__init__(settings, settings.topic_pings, settings.group_id, settings.wall_clock,
                         settings.tick_s)  # fmt: skip
        self.gsettings = settings
        self.index = ZoneIndex([], settings.dosage)
        self.versions: dict[str, int] = {}
        self.trackers: dict[int, VisitTracker] = {}
        self._next_table: dict[int, int] = {}  # partition -> the number its next save takes
        self.reader = FastPings()
        self._backlog: list[Record] = []  # outputs from restoring, sent with the next batch
        self._zone_task: asyncio.Task[None] | None = None
        self._zones_changed = asyncio.Event()
        self._listen_conn: asyncpg.Connection | None = None
        self.http = HttpServer(probe_app(self.name, lambda: self.ready), settings.http_host,
                               settings.http_port)  # fmt: skip

    async def start(self) -> None:
        s = self.gsettings
        # Compiled (or loaded from numba's cache) while the connections open, not on the
        # first fetch.
        warm = asyncio.create_task(asyncio.to_thread(warm_up))
        await kafka.ensure_topics(s, {s.topic_pings: {}, s.topic_visits: {}})
        await self.open_database()
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            saved = await conn.fetchval(
                "SELECT value::text FROM service_meta WHERE key = $1", self._meta_key
            )
        # Zone versions already announced: edits made while every instance was down are
        # announced now (dosewatch.zone.changed), and their ids make repeats harmless.
        self.versions = orjson.loads(saved) if saved else {}
        changed = await self._load_zones()
        await self.start_kafka()
        if changed:
            await self.publish([kafka_record(self._zone_changed(c)) for c in changed])
            assert self.out is not None
            await self.out.acked()  # announced before the versions are marked as announced
        await self._save_versions()
        await self._listen()
        await self.http.start()
        await warm
        self.ready = True
        log.info("geofence ready", extra={"zones": len(self.index), "http_port": self.http.port})

    async def stop(self) -> None:
        self.ready = False
        await self.http.stop()
        if self._zone_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._zone_task, 10)
        if self._listen_conn is not None and self.pool is not None:
            with contextlib.suppress(Exception):  # it may have died with the database
                await self._listen_conn.remove_listener(CHANNEL, self._on_notify)
                await self.pool.release(self._listen_conn, timeout=1)
        await self.stop_clients()

    async def run(self) -> None:
        watcher = asyncio.create_task(self._follow_zones())
        try:
            await super().run()
        finally:
            watcher.cancel()

    # -- zones -------------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._zones_changed.set()

    @property
    def _meta_key(self) -> str:
        return f"geofence.zone_versions:{self.gsettings.topic_pings}"

    async def _save_versions(self) -> None:
        assert self.pool is not None
        pool, body = self.pool, orjson.dumps(self.versions).decode()

        async def write() -> None:
            await pool.execute(
                "INSERT INTO service_meta (key, value) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                self._meta_key, body,
            )  # fmt: skip

        await db.retrying(write, "save zone versions", on_retry=self._retried)

    async def _load_zones(self) -> list[dict[str, Any]]:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            stored = await load_zones(conn)
        # Built off the loop: ping processing carries on with the old index meanwhile.
        index = await asyncio.to_thread(ZoneIndex, [z.spec for z in stored], self.settings.dosage)
        changed = [
            {"zone_id": z.spec.zone_id, "version": z.version, "change": "updated"
             if z.spec.zone_id in self.versions else "created"}
            for z in stored if self.versions.get(z.spec.zone_id) != z.version
        ]  # fmt: skip
        live = {z.spec.zone_id for z in stored}
        changed += [
            {"zone_id": zid, "version": v + 1, "change": "deleted"}
            for zid, v in self.versions.items()
            if zid not in live
        ]
        self.versions = {z.spec.zone_id: z.version for z in stored}
        self.index = index
        return changed

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; a change missed while it was down is caught by
        reloading once it is back."""
        assert self.pool is not None
        pool = self.pool
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await pool.release(self._listen_conn, timeout=1)
        conn = await db.retrying(pool.acquire, "listen", on_retry=self._retried)
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listen_conn = conn

    async def _follow_zones(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._zones_changed.wait(), timeout=1.0)
            except TimeoutError:
                if self._listen_conn is None or self._listen_conn.is_closed():
                    await self._listen()
                    self._zones_changed.set()
                continue
            self._zones_changed.clear()
            changed = await db.retrying(self._load_zones, "load zones", on_retry=self._retried)
            # Shielded like a batch: a stop waits for it rather than cutting it mid-publish.
            self._zone_task = asyncio.create_task(self._apply_zone_change(changed))
            await asyncio.shield(self._zone_task)

    async def _apply_zone_change(self, changed: list[dict[str, Any]]) -> None:
        async with self.lock:
            events: list[VisitEvent] = []
            for tracker in self.trackers.values():
                events.extend(tracker.replace_index(self.index))
            outputs = self._records_of(events)
            outputs += [kafka_record(self._zone_changed(c)) for c in changed]
            await self.publish(outputs)
            await self.save(outputs, {})
            await self._save_versions()
        log.info("zones reloaded", extra={"zones": len(self.index), "changed": len(changed)})

    def _zone_changed(self, change: dict[str, Any]) -> dict[str, Any]:
        zid = change["zone_id"]
        at = self.index.position.get(zid)
        schedule = None if at is None else self.index.zones[at].properties.get("schedule")
        return zone_changed_cloudevent(
            zid, change["version"], change["change"], self.index.rules_by_id.get(zid),
            int(time.time() * 1000), self.gsettings.source, schedule,
        )  # fmt: skip

    # -- partitions --------------------------------------------------------------------------

    def restore_partition(self, partition: int, rows: dict[str, Any]) -> None:
        tracker = VisitTracker(self.index, self.settings.dosage)
        tracker.restore_meta(rows.get(META, {}))
        # Units saved a row each (before tables) are older than any table; tables in order.
        units = {k: v for k, v in rows.items() if k != META and not k.startswith(TABLE)}
        tables = sorted(int(k.removeprefix(TABLE)) for k in rows if k.startswith(TABLE))
        for n in tables:
            units.update(units_of_table(rows[f"{TABLE}{n}"]))
        for unit_id, value in units.items():
            tracker.restore_unit(unit_id, value)
        self.trackers[partition] = tracker
        self._next_table[partition] = tables[-1] + 1 if tables else 0
        # Visits in zones deleted while this partition was unowned end now, not crash later.
        self._backlog.extend(self._records_of(tracker.reconcile()))

    def output_topics(self) -> list[str]:
        return [self.gsettings.topic_visits]

    def drop_partition(self, partition: int) -> None:
        self.trackers.pop(partition, None)
        self._next_table.pop(partition, None)

    def partition_clock(self, partition: int) -> int | None:
        return self.trackers[partition].clock

    def process(
        self, partition: int, records: list[FetchedRecord]
    ) -> tuple[list[Record], int | None]:
        tracker = self.trackers[partition]
        backlog, self._backlog = self._backlog, []
        # The whole fetch in one msgspec call, into columns: no object per ping.
        read = self.reader.read_values([r.value or b"" for r in records])
        if read.unread:
            self._read_slowly(partition, records, read)
        n = len(read.ts)
        PINGS_IN.labels(self.name, "kafka").inc(n)
        if not n:
            return backlog, None
        events = tracker.process_rows(read.unit_id, read.ts, read.lon, read.lat,
                                       read.accuracy_m)  # fmt: skip
        newest = max(read.ts)
        LATENCY.labels(self.name).observe(max(0.0, time.time() - newest / 1000))
        return backlog + visit_records(events, self.gsettings.source), newest

    def _read_slowly(self, partition: int, records: list[FetchedRecord], read: PingColumns) -> None:
        """Records the fast reader left (none from ingest, which writes the canonical form):
        orjson and parse_ts, in their place in the partition's order."""
        fast = iter(zip(read.unit_id, read.ts, read.lon, read.lat, read.accuracy_m, strict=True))
        unread = set(read.unread)
        rows: list[tuple[str, int, float, float, float | None]] = []
        for k, record in enumerate(records):
            if k not in unread:
                rows.append(next(fast))
                continue
            try:
                d = orjson.loads(record.value or b"")
                rows.append((d["unit_id"], parse_ts(d["ts"]), float(d["lon"]), float(d["lat"]),
                             d.get("accuracy_m")))  # fmt: skip
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                # Ingest validated it; a record that still fails was not written by ingest.
                log.error("unreadable ping skipped", extra={"partition": partition,
                                                            "offset": record.offset})  # fmt: skip
        read.unit_id, read.ts, read.lon, read.lat, read.accuracy_m = (
            [list(c) for c in zip(*rows, strict=True)] if rows else ([], [], [], [], [])
        )
        read.unread = []

    def tick(self, partition: int, clock: int) -> list[Record]:
        backlog, self._backlog = self._backlog, []
        events = self.trackers[partition].advance_rows(clock)
        return backlog + visit_records(events, self.gsettings.source)

    def _records_of(self, events: list[VisitEvent]) -> list[Record]:
        """Events of the rarer paths (zone changes, restores), through their CloudEvent dicts:
        `visit_records` writes the same bytes for the hot ones."""
        return [kafka_record(visit_cloudevent(e, self.gsettings.source)) for e in events]

    def full_state(self, partition: int) -> dict[str, Any]:
        tracker = self.trackers.get(partition)
        if tracker is not None:
            tracker.dirty.update(tracker.unit_ids)  # a snapshot is a save with every unit changed
        return self.dirty_state(partition)

    def dirty_state(self, partition: int) -> dict[str, Any]:
        """The changed units as one table under a key of its own (the save's number), so a
        save adds a table and the newest table holding a unit is its state."""
        tracker = self.trackers.get(partition)
        if tracker is None:
            return {}
        rows: dict[str, Any] = {META: tracker.export_meta()}
        if tracker.dirty:
            n = self._next_table[partition]
            self._next_table[partition] = n + 1
            rows[f"{TABLE}{n}"] = tracker.export_table(tracker.dirty)
            tracker.dirty.clear()
        OPEN_VISITS.labels(self.name).set(sum(t.open_visits for t in self.trackers.values()))
        return rows

    async def publish(self, outputs: list[Record]) -> None:
        if not outputs:
            return
        assert self.out is not None
        topic = self.gsettings.topic_visits
        await self.out.send(topic, outputs, wait=False)
        EVENTS_OUT.labels(self.name, topic).inc(len(outputs))


def kafka_record(doc: dict[str, Any]) -> Record:
    """An event as the visits topic carries it: keyed by zone (the subject), JSON."""
    return doc["subject"].encode(), orjson.dumps(doc)


async def main(settings: GeofenceSettings | None = None) -> None:
    await run_stage(GeofenceService(settings or GeofenceSettings()))


__all__ = ["GeofenceService", "GeofenceSettings", "main"]
