"""Feeds the API's in-memory view: zone statuses (the compacted topic, from the beginning),
units' last fixes (avl.pings, from now on) and zone metadata (PostgreSQL, with NOTIFY).

Every replica reads every partition without a consumer group: each serves all zones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
import orjson
import shapely
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.zone import ZoneFeature
from services.api.context import ApiContext, Fix, ZoneInfo
from services.common import kafka
from services.common.lag import LagWatch
from services.common.zonestore import CHANNEL

log = logging.getLogger(__name__)

_ZERO_SHIFT = {"presence_s": 0.0, "officer_s": 0.0, "visits": 0, "dosed_visits": 0}


def initial_status(info: ZoneInfo, target_s: float) -> dict[str, Any]:
    """A zone nobody has visited since dosage started: due, with nothing present. Its as_of
    is the epoch, so the first real status replaces it."""
    epoch = "1970-01-01T00:00:00.000Z"
    return {
        "zone_id": info.zone_id, "status": "due", "as_of": epoch, "occupied_since": None,
        "elapsed_s": 0.0, "remaining_s": 0.0, "target_s": target_s, "units_present": [],
        "units": [], "last_dosed_end": None,
        "shift": {"zone_id": info.zone_id, "period_start": epoch, "period_end": epoch,
                  **_ZERO_SHIFT},
    }  # fmt: skip


def zone_info(feature: dict[str, Any]) -> ZoneInfo:
    zone = ZoneFeature.model_validate(feature)
    props = zone.properties.model_dump(exclude_none=True)
    w, s, e, n = (float(v) for v in shapely.bounds(zone.shape()))
    district = props.get("district")
    return ZoneInfo(zone.zone_id, props.get("name"),
                    str(district) if district is not None else None, (w, s, e, n),
                    feature)  # fmt: skip


class LiveFeed:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.consumer: AIOKafkaConsumer | None = None
        self._listen: asyncpg.Connection | None = None
        self._zones_changed = asyncio.Event()
        self.lag = LagWatch("api", ctx.settings.consumer_stall_s)

    async def start(self) -> None:
        await self.load_zones()
        await self._connect_listener()
        await self.connect()

    async def connect(self, pings_from_start: bool = False, bootstrap: str | None = None) -> None:
        """Read the broker (or the one at `bootstrap`, which it moved to): statuses from the
        beginning, pings from now on (or, on a broker that is new, from its beginning). The
        view held so far stays; what is read updates it."""
        s = self.ctx.settings
        if bootstrap is not None:
            s = self.ctx.settings = s.model_copy(update={"kafka_bootstrap": bootstrap})
        status_topic, pings_topic = s.topic("dosage.zone-status"), s.topic_pings
        await kafka.ensure_topics(s, {status_topic: kafka.COMPACTED, pings_topic: {}})
        self.lag = LagWatch("api", s.consumer_stall_s)  # offsets start afresh with a consumer
        self.consumer = kafka.reader(s)
        await self.consumer.start()
        await self.consumer.topics()  # metadata for every topic
        parts: list[TopicPartition] = []
        for topic in (status_topic, pings_topic):
            found = self.consumer.partitions_for_topic(topic) or set()
            parts += [TopicPartition(topic, p) for p in sorted(found)]
        self.consumer.assign(parts)
        for tp in parts:
            if tp.topic == status_topic or pings_from_start:
                await self.consumer.seek_to_beginning(tp)
            else:
                await self.consumer.seek_to_end(tp)
        await self._catch_up([tp for tp in parts if tp.topic == status_topic])

    async def _catch_up(self, status_parts: list[TopicPartition]) -> None:
        """Read statuses up to the end each partition had when this replica looked: then it
        is current. Pings are left buffered meanwhile (they arrive all the time, so "a fetch
        came back empty" would never happen on a live system)."""
        assert self.consumer is not None
        consumer = self.consumer
        while True:
            batches = await consumer.getmany(*status_parts, timeout_ms=300)
            self._apply(batches)
            behind = False
            for tp in status_parts:
                end = consumer.highwater(tp)
                if end is None or await consumer.position(tp) < end:
                    behind = True
            if not behind or (not batches and all(
                consumer.highwater(tp) is None for tp in status_parts
            )):  # fmt: skip
                break
        target = self.ctx.settings.dosage.rules_for().target_ms / 1000
        for zone_id in set(self.ctx.book.zones) - set(self.ctx.zones):
            self.ctx.book.remove(zone_id)  # deleted zones' last statuses stay on the topic
        for zone_id, info in self.ctx.zones.items():
            if zone_id not in self.ctx.book.zones:
                self.ctx.book.apply(initial_status(info, target))
        self.ctx.ready = True

    async def load_zones(self) -> None:
        async with self.ctx.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT feature::text AS feature FROM zones WHERE NOT deleted ORDER BY zone_id"
            )
        zones = {}
        for r in rows:
            info = zone_info(orjson.loads(r["feature"]))
            zones[info.zone_id] = info
        gone = set(self.ctx.zones) - set(zones)
        self.ctx.zones = zones
        target = self.ctx.settings.dosage.rules_for().target_ms / 1000
        for zone_id in gone:
            if self.ctx.book.remove(zone_id) is not None:
                self.ctx.changed.set()
        if self.ctx.ready:
            for zone_id, info in zones.items():
                if zone_id not in self.ctx.book.zones:
                    self.ctx.book.apply(initial_status(info, target))
                    self.ctx.changed.set()

    def _apply(self, batches: dict[TopicPartition, list[Any]]) -> None:
        status_topic = self.ctx.settings.topic("dosage.zone-status")
        changed = False
        for tp, records in batches.items():
            if tp.topic == status_topic:
                for r in records:
                    if r.value is None and r.key is not None:  # a deleted zone's tombstone
                        changed |= self.ctx.book.remove(r.key.decode()) is not None
                        continue
                    try:
                        status = orjson.loads(r.value)
                        changed |= self.ctx.book.apply(status) is not None
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        where = {"partition": tp.partition, "offset": r.offset}
                        log.error("unreadable zone status skipped", extra=where)
            else:
                for r in records:
                    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                        p = orjson.loads(r.value)
                        self.ctx.fixes[p["unit_id"]] = Fix(p["lat"], p["lon"], p["ts"],
                                                           r.timestamp / 1000)  # fmt: skip
        if changed:
            self.ctx.changed.set()

    async def run(self) -> None:
        assert self.consumer is not None
        zones = asyncio.create_task(self._follow_zones())
        next_sweep = time.monotonic() + 60
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=200)
                self.lag.fetched(self.consumer, batches, time.monotonic())
                if batches:
                    self._apply(batches)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + 60
                    self._forget_old_fixes()
        finally:
            zones.cancel()

    def _forget_old_fixes(self) -> None:
        """Units that stopped reporting leave the map (and memory)."""
        horizon = time.time() - self.ctx.settings.fix_ttl_s
        for unit in [u for u, f in self.ctx.fixes.items() if f.received < horizon]:
            del self.ctx.fixes[unit]

    async def _connect_listener(self) -> None:
        self._listen = await asyncpg.connect(self.ctx.settings.database_url.get_secret_value())
        await self._listen.add_listener(CHANNEL, lambda *_: self._zones_changed.set())

    async def _follow_zones(self) -> None:
        """Reload zones on NOTIFY. A lost listener (database restart, failover) is
        reconnected, and zones are reloaded then, since notifications may have been missed."""
        while True:
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._zones_changed.wait(), timeout=2.0)
                if self._listen is None or self._listen.is_closed():
                    await self._connect_listener()
                    self._zones_changed.set()
                if not self._zones_changed.is_set():
                    continue
                self._zones_changed.clear()
                await self.load_zones()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never die silently: a bad row or a lost connection is retried.
                log.exception("zone reload failed; retrying")
                self._zones_changed.set()
                await asyncio.sleep(1.0)

    async def drained(self, since_ms: float) -> bool:
        """Whether the view holds every status and ping on the broker, as of `since_ms`."""
        assert self.consumer is not None
        return await kafka.caught_up(self.consumer, since_ms)

    async def disconnect(self) -> None:
        """Let go of the broker (`run` must have stopped); the view is kept for `connect`."""
        if self.consumer is not None:
            await kafka.stop_client(self.consumer)
            self.consumer = None

    async def stop(self) -> None:
        await self.disconnect()
        if self._listen is not None:
            with contextlib.suppress(Exception):
                await self._listen.close()
