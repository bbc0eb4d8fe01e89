"""The dosage service: visit events (keyed by zone) -> zone status, history and audit.

Per partition a zone board follows the partition's stream clock (the emitting geofence's
clock, plus wall time since the last record), so `met`, `overstay` and `due` appear on time
even when no ping arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from schemas.timefmt import ms_to_datetime, parse_ts
from services.common import db, kafka
from services.common.fetched import FetchedRecord
from services.common.http import HttpServer, probe_app
from services.common.metrics import EVENTS_OUT, LATENCY
from services.common.moving import run_stage
from services.common.settings import CommonSettings
from services.common.stateful import StatefulService
from services.common.zonestore import load_zones
from services.dosage.core.board import StatusChange, ZoneBoard
from services.dosage.core.events import (
    VISIT_TYPES,
    ZONE_CHANGED,
    status_cloudevent,
    status_row,
    visit_event_from_cloudevent,
)
from services.dosage.core.params import ZoneRules
from services.dosage.core.periods import ShiftCalendar, parse_shift_starts
from services.dosage.core.schedule import WeeklySchedule
from services.dosage.core.tracker import VisitEventKind
from services.dosage.periodstore import refresh_periods

log = logging.getLogger(__name__)
META = ""
# A move publishes every zone's status again (`_republish`) in slices this size, paced: a
# slice holds the loop for 2-4 ms, and the pause lets the pings' batches run between them.
REPUBLISH_SLICE = 250  # zones
REPUBLISH_PAUSE_S = 0.02
_VISIT_TYPES = set(VISIT_TYPES.values())


class DosageSettings(CommonSettings):
    group_id: str = "dosewatch-dosage"
    wall_clock: bool = True
    tick_s: float = 0.5
    source: str = "urn:dosewatch:dosage"


@dataclass(frozen=True, slots=True)
class Output:
    audit: dict[str, Any] | None = None  # a CloudEvent for dosage.audit and the audit log
    status: dict[str, Any] | None = None  # a zone status for the compacted topic
    visit: dict[str, Any] | None = None  # a closed visit row for the history table
    rules: ZoneRules | None = None
    deleted_zone: str | None = None  # a tombstone for the compacted status topic


class DosageService(StatefulService):
    name = "dosage"

    def __init__(self, settings: DosageSettings) -> None:
        super().__init__(settings, settings.topic_visits, settings.group_id, settings.wall_clock,
                         settings.tick_s)  # fmt: skip
        self.dsettings = settings
        self._republishing: asyncio.Task[None] | None = None
        # zone -> its status as last published, encoded: what the compacted topic holds for it,
        # which a move to another broker publishes there again without building it anew.
        self._published: dict[str, bytes] = {}
        self.calendar = ShiftCalendar(settings.tz, parse_shift_starts(settings.shifts))
        self.rules: dict[str, ZoneRules] = {}
        self.boards: dict[int, ZoneBoard] = {}
        self.http = HttpServer(probe_app(self.name, lambda: self.ready), settings.http_host,
                               settings.http_port)  # fmt: skip

    async def start(self) -> None:
        s = self.dsettings
        await kafka.ensure_topics(
            s, {s.topic_visits: {}, s.topic_status: kafka.COMPACTED, s.topic_audit: {}}
        )
        await self.open_database()
        await self._load_rules()
        await self.start_kafka()
        await self.http.start()
        self.ready = True
        log.info("dosage ready", extra={"zones": len(self.rules), "http_port": self.http.port})

    async def stop(self) -> None:
        self.ready = False
        await self.http.stop()
        await self._stop_republishing()
        await self.stop_clients()

    async def _stop_republishing(self) -> None:
        if self._republishing is not None:
            self._republishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._republishing
            self._republishing = None

    # -- partitions --------------------------------------------------------------------------

    async def _load_rules(self) -> None:
        assert self.pool is not None
        pool = self.pool

        async def load() -> list[Any]:
            async with pool.acquire() as conn:
                return await load_zones(conn)

        stored = await db.retrying(load, "load zones", on_retry=self._retried)
        self.rules = {
            z.spec.zone_id: self._rules_of(
                z.spec.zone_id, z.spec.target_s, z.spec.min_visit_s, z.spec.max_visit_s,
                z.spec.properties.get("schedule"),
            )
            for z in stored
        }  # fmt: skip
        for board in self.boards.values():
            for zone_id, rules in self.rules.items():
                board.upsert_zone(zone_id, rules)

    def restore_partition(self, partition: int, rows: dict[str, Any]) -> None:
        board = ZoneBoard(dict(self.rules), self.settings.dosage, self.calendar)
        board.restore_meta(rows.get(META, {}))
        for key, value in rows.items():
            if key != META:
                board.restore_zone(key, value)
        board.dirty.clear()
        self.boards[partition] = board
        self._published.clear()  # another instance may have published since (rare: rebuilt)

    def output_topics(self) -> list[str]:
        return [self.settings.topic_status, self.settings.topic_audit]

    def drop_partition(self, partition: int) -> None:
        self.boards.pop(partition, None)
        self._published.clear()  # its zones' statuses are another instance's to publish now

    async def move(self) -> kafka.MovedFrom:
        await self._stop_republishing()  # the slices left would go to the new broker only
        left = await super().move()
        # The new broker's status topic is empty, and the API rebuilds its view from it.
        self._republishing = asyncio.create_task(self._republish())
        return left

    async def _republish(self) -> None:
        """Publish every owned zone's status again, paced slices between batches: what the
        old broker's compacted topic held for it, as last published. A zone this process has
        not published since it took the partition is built from the board as it stands.
        Built anew, a status holds the loop about 20 us; sent as last encoded, 3-6 (5,000
        zones: 16-33 ms in 20 slices over 0.42 s, against 69 ms with half of them built, and
        110 ms unpaced; docs/performance.md, "Sixteenth round"). Each slice reads what was
        last published when it goes, so a zone that changed meanwhile goes out as it is now,
        after its change's own status."""
        started, built, held = time.monotonic(), 0, 0.0
        owned = self._owned(sorted(self.partitions))
        for start in range(0, len(owned), REPUBLISH_SLICE):
            if start:
                await asyncio.sleep(REPUBLISH_PAUSE_S)
            async with self.lock:
                took = time.monotonic()
                statuses: list[tuple[bytes, bytes | None]] = []
                for p, zone_id in owned[start : start + REPUBLISH_SLICE]:
                    encoded = self._published.get(zone_id)
                    if encoded is None and p in self.boards and zone_id in self.boards[p].zones:
                        encoded = orjson.dumps(status_row(self.boards[p].snapshot(zone_id)))
                        self._published[zone_id] = encoded
                        built += 1
                    if encoded is not None:
                        statuses.append((zone_id.encode(), encoded))
                await self._send_statuses(statuses)
                held += time.monotonic() - took
        # held_s: how long the slices held the loop (and the pings), of took_s in all.
        took_s = round(time.monotonic() - started, 3)
        log.info("statuses published again", extra={"zones": len(owned), "built": built,
                 "held_s": round(held, 4), "took_s": took_s})  # fmt: skip

    def _owned(self, partitions: list[int]) -> list[tuple[int, str]]:
        """(partition, zone) for every zone these partitions own that has a status (every
        board holds every zone's rules; a zone's visits, and so its status, go to the
        partition of its key)."""
        assert self.consumer is not None
        count = len(self.consumer.partitions_for_topic(self.topic) or ())
        out = []
        for p in partitions:
            board = self.boards[p]
            if board.clock is None:
                continue  # nothing has happened here: no status was ever published
            out += [(p, zone_id) for zone_id in board.zones
                    if kafka.partition_for(zone_id.encode(), count) == p]  # fmt: skip
        return out

    def partition_clock(self, partition: int) -> int | None:
        return self.boards[partition].clock

    async def on_assign(self) -> None:
        # Another instance may have seen the zone changes for partitions that move here now.
        assert self.pool is not None
        await self._load_rules()

    def process(self, partition: int, records: list[FetchedRecord]) -> tuple[list[Any], int | None]:
        board = self.boards[partition]
        out: list[Output] = []
        newest: int | None = None
        for record in records:
            try:
                doc = orjson.loads(record.value or b"")
                kind = doc["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("unreadable visit event skipped",
                          extra={"partition": partition, "offset": record.offset})  # fmt: skip
                continue
            if kind == ZONE_CHANGED:
                out.append(Output(audit=doc))
                at = self._zone_changed(doc, board, out)
                if at is not None:
                    newest = at if newest is None else max(newest, at)
                continue
            if kind not in _VISIT_TYPES:
                continue
            zone_id = doc["subject"]
            rules = self.rules.get(zone_id) or self.settings.dosage.rules_for()
            event = visit_event_from_cloudevent(doc, rules)
            newest = event.clock if newest is None else max(newest, event.clock)
            out.append(Output(audit=doc))
            if event.kind is VisitEventKind.ENDED:
                out.append(Output(visit=doc["data"], rules=rules))
            changes = board.advance(event.clock) + board.apply(event)
            out.extend(self._changes(changes))
            if (
                event.kind in (VisitEventKind.STARTED, VisitEventKind.ENDED)
                and event.zone_id in board.zones
                and not any(c.zone_id == event.zone_id for c in changes)
            ):
                # Who is present changed without the status changing: consoles show it too.
                out.append(Output(status=status_row(board.snapshot(event.zone_id))))
        if newest is not None:
            LATENCY.labels(self.name).observe(max(0.0, time.time() - newest / 1000))
        return out, newest

    def tick(self, partition: int, clock: int) -> list[Any]:
        return self._changes(self.boards[partition].advance(clock))

    def _changes(self, changes: list[StatusChange]) -> list[Output]:
        source = self.dsettings.source
        out = []
        for c in changes:
            status = status_row(c.snapshot)  # built once: the event's data extends it
            out.append(Output(audit=status_cloudevent(c, source, status), status=status))
        return out

    def _rules_of(
        self,
        zone_id: str,
        target_s: float | None,
        min_visit_s: float | None,
        max_visit_s: float | None,
        schedule: Any,
    ) -> ZoneRules:
        parsed = None
        if schedule is not None:
            try:
                parsed = WeeklySchedule.parse(schedule, self.settings.tz)
            except ValueError as exc:
                # Zones are validated when written: this one was edited by hand.
                log.error("zone schedule ignored: always active",
                          extra={"zone_id": zone_id, "error": str(exc)})  # fmt: skip
        return self.settings.dosage.rules_for(target_s, min_visit_s, max_visit_s, parsed)

    def _zone_changed(self, doc: dict[str, Any], owner: ZoneBoard, out: list[Output]) -> int | None:
        """Apply a zone edit to every board; the one it arrived on owns the zone and reports a
        schedule's effect now. Returns a clock for a partition that has none yet."""
        data = doc["data"]
        zone_id = data["zone_id"]
        if data.get("change") == "deleted":
            self.rules.pop(zone_id, None)
            for board in self.boards.values():
                board.remove_zone(zone_id)
            # The owner's tombstone lets compaction drop the zone's last status, and tells
            # readers of the topic (the API) that it is gone.
            out.append(Output(deleted_zone=zone_id))
            return None
        rules = self._rules_of(zone_id, data.get("target_s"), data.get("min_visit_s"),
                               data.get("max_visit_s"), data.get("schedule"))  # fmt: skip
        self.rules[zone_id] = rules
        for board in self.boards.values():
            board.upsert_zone(zone_id, rules)
        started = None
        if owner.clock is None and rules.schedule is not None:
            # No visit has come this way yet, so no stream clock: the edit's time starts one,
            # or a scheduled zone would not go inactive until somebody visited a zone here.
            started = parse_ts(doc["time"])
            out.extend(self._changes(owner.advance(started)))
        out.extend(self._changes(owner.rules_changed(zone_id)))
        return started

    def full_state(self, partition: int) -> dict[str, Any]:
        board = self.boards.get(partition)
        if board is not None:
            board.dirty.update(board.zones)  # a snapshot is a save with every zone changed
        return self.dirty_state(partition)

    def dirty_state(self, partition: int) -> dict[str, Any]:
        board = self.boards.get(partition)
        if board is None:
            return {}
        rows: dict[str, Any] = {z: board.export_zone(z) for z in board.dirty if z in board.zones}
        board.dirty.clear()
        rows[META] = board.export_meta()
        return rows

    # -- outputs -----------------------------------------------------------------------------

    async def publish(self, outputs: list[Any]) -> None:
        assert self.out is not None
        s = self.dsettings
        statuses: list[tuple[bytes, bytes | None]] = []
        for o in outputs:
            if o.status is not None:
                zone_id = o.status["zone_id"]
                encoded = self._published[zone_id] = orjson.dumps(o.status)
                statuses.append((zone_id.encode(), encoded))
            elif o.deleted_zone is not None:
                self._published.pop(o.deleted_zone, None)
                statuses.append((o.deleted_zone.encode(), None))
        audits = [(o.audit["subject"].encode(), orjson.dumps(o.audit))
                  for o in outputs if o.audit is not None]  # fmt: skip
        await self._send_statuses(statuses)
        if audits:
            await self.out.send(s.topic_audit, audits, wait=False)
            EVENTS_OUT.labels(self.name, s.topic_audit).inc(len(audits))

    async def _send_statuses(self, statuses: list[tuple[bytes, bytes | None]]) -> None:
        assert self.out is not None
        if statuses:
            topic = self.dsettings.topic_status
            await self.out.send(topic, statuses, wait=False)
            EVENTS_OUT.labels(self.name, topic).inc(len(statuses))

    async def write(self, conn: asyncpg.Connection, outputs: list[Any]) -> None:
        # One statement per table over arrays, not a round trip per row: a commit interval
        # at full rate carries hundreds of events and visits.
        audits = [o.audit for o in outputs if o.audit is not None]
        if audits:
            await conn.execute(
                "INSERT INTO audit_log (event_id, type, subject, time, event) "
                "SELECT i, t, s, tm, e::jsonb FROM unnest($1::text[], $2::text[], $3::text[], "
                "$4::timestamptz[], $5::text[]) WITH ORDINALITY AS a(i, t, s, tm, e, n) "
                "ORDER BY n ON CONFLICT (event_id) DO NOTHING",
                [a["id"] for a in audits], [a["type"] for a in audits],
                [a["subject"] for a in audits], [_db_time(a["time"]) for a in audits],
                [orjson.dumps(a).decode() for a in audits],
            )  # fmt: skip
        visits = [(o.visit, o.rules) for o in outputs if o.visit is not None]
        if not visits:
            return
        rows = [v for v, _ in visits]
        await conn.execute(
            "INSERT INTO visits (unit_id, zone_id, started_at, ended_at, duration_s, end_reason, "
            "qualified, target_met, overstay) SELECT * FROM unnest($1::text[], $2::text[], "
            "$3::timestamptz[], $4::timestamptz[], $5::float8[], $6::text[], $7::bool[], "
            "$8::bool[], $9::bool[]) ON CONFLICT (unit_id, zone_id, started_at) DO NOTHING",
            [v["unit_id"] for v in rows], [v["zone_id"] for v in rows],
            [_db_time(v["started_at"]) for v in rows], [_db_time(v["ended_at"]) for v in rows],
            [v["duration_s"] for v in rows], [v["end_reason"] for v in rows],
            [v["qualified"] for v in rows], [v["target_met"] for v in rows],
            [v["overstay"] for v in rows],
        )  # fmt: skip
        closed = [
            (v["zone_id"], parse_ts(v["started_at"]), parse_ts(v["ended_at"]), rules.target_ms)
            for v, rules in visits
            if v["qualified"] and rules is not None
        ]
        await refresh_periods(conn, closed, self.calendar)


def _db_time(text: str) -> datetime:
    """A wire time (RFC 3339) as the timestamptz asyncpg writes."""
    return ms_to_datetime(parse_ts(text))


async def main(settings: DosageSettings | None = None) -> None:
    await run_stage(DosageService(settings or DosageSettings()))


__all__ = ["DosageService", "DosageSettings", "main"]
