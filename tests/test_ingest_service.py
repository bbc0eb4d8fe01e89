"""Ingest against a real broker: good pings flow, bad ones reach the DLQ, nothing stops it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.ingest.service import IngestService, IngestSettings

GOOD = {"unit_id": "car-1", "ts": "2026-05-14T13:00:05-05:00", "lat": 40.7, "lon": -74.0}


async def drain(bootstrap: str, topic: str, want: int, timeout_s: float = 20) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=5
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < want:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


@contextlib.asynccontextmanager
async def running(settings: IngestSettings) -> AsyncIterator[AIOKafkaProducer]:
    """The service consuming the raw topic, and a producer to write to it."""
    service = IngestService(settings)
    await service.start()
    task = asyncio.create_task(service.run())
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()
        task.cancel()
        await service.stop()


def test_kafka_intake_normalises_and_dead_letters(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = IngestSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)

    async def scenario() -> None:
        async with running(settings) as producer:
            raw = settings.topic_raw
            # Keyed by unit, as a gateway that cares about order sends them: unkeyed raw
            # messages may land on different partitions and come out in another order.
            car = b"car-1"
            await producer.send_and_wait(raw, orjson.dumps(GOOD), key=car)
            poison = await producer.send_and_wait(raw, b"\xff not json", key=car)
            await producer.send_and_wait(
                raw, orjson.dumps([GOOD | {"ts": 1778781610000}, GOOD | {"lat": 91}]), key=car
            )
            await producer.send_and_wait(raw, orjson.dumps(GOOD | {"ts": 1778781620000}), key=car)
            pings = await drain(kafka_bootstrap, settings.topic_pings, 3)
            dead = await drain(kafka_bootstrap, settings.topic_dlq, 2)
        values = [orjson.loads(r.value) for r in pings]
        assert [v["ts"] for v in values] == [
            "2026-05-14T18:00:05.000Z",
            "2026-05-14T18:00:10.000Z",
            "2026-05-14T18:00:20.000Z",
        ]
        assert {r.key for r in pings} == {b"car-1"}
        assert len({r.partition for r in pings}) == 1  # one unit, one partition, in order
        letters = sorted(
            (orjson.loads(r.value) for r in dead), key=lambda d: d["rejected"][0]["index"] or -1
        )
        assert letters[0]["rejected"][0]["errors"][0]["reason"].startswith("invalid JSON")
        assert base64.b64decode(letters[0]["original_b64"]) == b"\xff not json"
        assert letters[0]["source"] == {
            "topic": raw,
            "partition": poison.partition,
            "offset": poison.offset,
        }
        assert letters[1]["rejected"] == [
            {
                "index": 1,
                "errors": [{"field": "lat", "reason": "Input should be less than or equal to 90"}],
            }
        ]

    asyncio.run(scenario())


def test_http_intake_and_osmand(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = IngestSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)

    async def scenario() -> None:
        service = IngestService(settings)
        await service.start()
        base = f"http://127.0.0.1:{service.http.port}"
        try:
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/readyz")).status_code == 200
                r = await client.post(
                    "/v1/pings", content=orjson.dumps([GOOD, GOOD | {"lon": 200}])
                )
                assert r.status_code == 200
                assert r.json()["accepted"] == 1
                assert r.json()["rejected"][0]["errors"][0]["field"] == "lon"
                assert (await client.post("/v1/pings", content=b"{")).status_code == 400
                r = await client.post("/v1/pings", content=orjson.dumps({"unit_id": "x"}))
                assert r.status_code == 422
                r = await client.get(
                    "/osmand",
                    params={"id": "car-9", "lat": "40.71", "lon": "-74.01",
                            "timestamp": "1778781605", "speed": "10", "bearing": "90",
                            "accuracy": "8", "batt": "77"},
                )  # fmt: skip
                assert r.status_code == 200 and r.json()["accepted"] == 1
                r = await client.get("/osmand", params={"id": "car-9", "lat": "north"})
                assert r.status_code == 422
                service.ready = False  # as while it stops, or stands still for a rollover
                r = await client.post("/v1/pings", content=orjson.dumps(GOOD))
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                service.ready = True
                metrics = (await client.get("/metrics")).text
                assert 'dosewatch_pings_rejected_total{reason="lon",service="ingest"}' in metrics
            pings = await drain(kafka_bootstrap, settings.topic_pings, 2)
            dead = await drain(kafka_bootstrap, settings.topic_dlq, 3)
        finally:
            await service.stop()
        osmand = next(orjson.loads(r.value) for r in pings if r.key == b"car-9")
        assert osmand["ts"] == "2026-05-14T18:00:05.000Z"
        assert abs(osmand["speed_mps"] - 5.14444) < 1e-6 and osmand["source"] == "osmand"
        assert len(dead) == 3

    asyncio.run(scenario())


def test_kafka_outputs_and_counters_are_the_slow_paths(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Mixed input through the service: every output byte, dead letter and counter is what
    the slow path (each message through `normalise_message`) gives."""
    from prometheus_client import REGISTRY

    from services.ingest.core.normalise import Limits, dead_letter, normalise_message

    settings = IngestSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    good = GOOD | {"ts": "2026-05-14T18:00:05.123Z"}
    raws = [
        orjson.dumps(good),
        orjson.dumps(GOOD | {"lat": 40, "accuracy_m": 1e16, "source": 'é😀 "}\n'}),
        orjson.dumps(good | {"ts": 1778781605000, "speed_mps": None}),
        b'{"unit_id":"car-1","ts":"2026-05-14t18:00:05.1234567z","lat":-0.0,"lon":5e-324}',
        orjson.dumps([good, good | {"lat": 91}]),
        orjson.dumps(good | {"lat": 91}),
        orjson.dumps(good | {"altitude": 3}),
        orjson.dumps(good | {"ts": "2099-01-01T00:00:00.000Z"}),
        b"\xff not json",
        b"",
        orjson.dumps(good | {"heading_deg": 359.5}),
    ]

    def counter(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"service": "ingest"} | labels) or 0.0

    names = [("dosewatch_pings_in_total", {"source": "kafka"}),
             ("dosewatch_pings_rejected_total", {"reason": "lat"}),
             ("dosewatch_pings_rejected_total", {"reason": "ts"}),
             ("dosewatch_pings_rejected_total", {"reason": "(message)"}),
             ("dosewatch_events_out_total", {"topic": settings.topic_pings}),
             ("dosewatch_events_out_total", {"topic": settings.topic_dlq})]  # fmt: skip
    before = [counter(n, **labels) for n, labels in names]

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        async with running(settings) as producer:
            sent = [await producer.send_and_wait(settings.topic_raw, r, key=b"car-1") for r in raws]
            pings = await drain(kafka_bootstrap, settings.topic_pings, 6)
            dead = await drain(kafka_bootstrap, settings.topic_dlq, 6)
        return pings, dead, sent

    pings, dead, sent = asyncio.run(scenario())
    limits = Limits(int(time.time() * 1000))
    want_pings: list[tuple[bytes, bytes]] = []
    want_dead: list[bytes] = []
    for raw, meta in zip(raws, sent, strict=True):
        ok, bad = normalise_message(raw, limits)
        want_pings += [(a.key, a.value) for a in ok]
        if bad:
            source = {"topic": settings.topic_raw, "partition": meta.partition,
                      "offset": meta.offset}  # fmt: skip
            want_dead.append(dead_letter(raw, bad, source))
    assert [(r.key, r.value) for r in pings] == want_pings
    # How far ahead a future ping was is measured against each side's own clock.
    ahead = re.compile(rb"\d+ s in the future")
    assert sorted(ahead.sub(b"N s in the future", r.value) for r in dead) == sorted(
        ahead.sub(b"N s in the future", d) for d in want_dead
    )
    after = [counter(n, **labels) for n, labels in names]
    # 12 pings in 11 messages; refused: 2 for lat, 1 for ts, 2 unreadable, 1 unknown field
    assert [a - b for a, b in zip(after, before, strict=True)] == [12, 2, 1, 2, 6, 6]


def test_kafka_offsets_are_committed_behind_their_outputs(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Commits run beside the loop (`IngestService._commit`): the group's committed offsets
    reach every message taken, over several commits, and a stop waits for the last one."""
    settings = IngestSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, commit_interval_ms=20
    )
    count = 60

    async def committed() -> int:
        probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap,
                                 group_id=settings.topic_prefix + settings.group_id)  # fmt: skip
        await probe.start()
        try:
            await probe.topics()  # metadata
            parts = probe.partitions_for_topic(settings.topic_raw) or set()
            tps = [TopicPartition(settings.topic_raw, p) for p in parts]
            return sum([await probe.committed(tp) or 0 for tp in tps])
        finally:
            await probe.stop()

    async def scenario() -> tuple[int, int]:
        async with running(settings) as producer:
            for i in range(count):
                ping = GOOD | {"ts": 1778781605000 + i * 1000, "unit_id": f"car-{i % 7}"}
                await producer.send_and_wait(settings.topic_raw, orjson.dumps(ping),
                                             key=b"car-%d" % (i % 7))  # fmt: skip
                if i % 10 == 9:
                    await asyncio.sleep(0.05)  # several fetches, several commits
            await drain(kafka_bootstrap, settings.topic_pings, count)
            async with asyncio.timeout(20):
                while (during := await committed()) < count:
                    await asyncio.sleep(0.1)
        return during, await committed()

    during, after = asyncio.run(scenario())
    assert during == count and after == count
