"""Consumer lag and stalls (`services.common.lag`): the stall rules table-driven and as a
property, and the gauge on the real broker, where a partition that is handed nothing in a
fetch still shows how far behind it is."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.common import kafka
from services.common.lag import Change, LagWatch, StallWatch
from services.common.settings import CommonSettings
from tests.api_helpers import api_stack, occupy, wait_until

TP = TopicPartition("t", 0)

# (lag, records handed out, now) per fetch -> the change each fetch reports; stall_s = 10
Fetches = list[tuple[int, bool, float]]
CASES: dict[str, tuple[Fetches, list[Change | None]]] = {
    "caught up all along": ([(0, False, 0), (0, False, 20), (0, False, 40)], [None] * 3),
    "behind and reading": ([(9, True, 0), (8, True, 20), (7, True, 40)], [None] * 3),
    "behind, handed nothing": (
        [(0, False, 0), (5, False, 1), (5, False, 10.9), (5, False, 11), (6, False, 30)],
        [None, None, None, "stalled", None],
    ),
    "stalled, then records": (
        [(5, False, 0), (5, False, 10), (4, True, 12), (4, False, 13)],
        [None, "stalled", "resumed", None],
    ),
    "stalled, then the log was read to its end": (
        [(5, False, 0), (5, False, 10), (0, False, 12)],
        [None, "stalled", "resumed"],
    ),
    "the clock restarts with progress": (
        [
            (5, False, 0),
            (5, False, 9),
            (5, True, 9.5),
            (5, False, 12),
            (5, False, 21.9),
            (5, False, 22),
        ],
        [None, None, None, None, None, "stalled"],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_stall_rules(name: str) -> None:
    fetches, expected = CASES[name]
    watch = StallWatch(stall_s=10)
    assert [watch.update(TP, lag, out, now) for lag, out, now in fetches] == expected


def test_a_forgotten_partition_is_timed_afresh() -> None:
    watch = StallWatch(stall_s=10)
    assert watch.update(TP, 5, False, 0) is None
    assert watch.update(TP, 5, False, 10) == "stalled"
    watch.forget(TP)  # revoked, then assigned again
    assert watch.update(TP, 5, False, 11) is None  # neither "resumed" nor still stalled
    assert watch.update(TP, 5, False, 20.9) is None
    assert watch.update(TP, 5, False, 21) == "stalled"


@given(st.lists(st.tuples(st.integers(-2, 5), st.booleans(), st.floats(0, 20)), max_size=60))
def test_stalls_and_resumes_alternate(steps: list[tuple[int, bool, float]]) -> None:
    """Whatever the fetches, a partition is reported stalled once until it resumes, and only
    resumes after a stall; a report of stalled comes only with a fetch that made no progress."""
    watch, now, changes = StallWatch(stall_s=10), 0.0, []
    for lag, out, dt in steps:
        now += dt
        change = watch.update(TP, lag, out, now)
        if change == "stalled":
            assert lag > 0 and not out
        if change is not None:
            changes.append(change)
    assert changes == ["stalled", "resumed"] * (len(changes) // 2) + ["stalled"] * (
        len(changes) % 2
    )


def _lag(topic: str, partition: int) -> float | None:
    labels = {"service": "lagtest", "topic": topic, "partition": str(partition)}
    return REGISTRY.get_sample_value("dosewatch_consumer_lag", labels)


async def _run(bootstrap: str, prefix: str) -> None:
    topic = prefix + "lag"
    await kafka.ensure_topics(CommonSettings(kafka_bootstrap=bootstrap, partitions=2), {topic: {}})
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5)
    await producer.start()
    await consumer.start()
    watch = LagWatch("lagtest", stall_s=0.2)
    try:
        for i in range(10):
            await producer.send_and_wait(topic, b"%d" % i, partition=0)
        consumer.assign([p0, p1])  # after the sends: its first fetch sees all ten
        await consumer.seek_to_beginning(p0, p1)
        got = 0
        while got < 10:  # all of p0, handed out 3 at a time
            batches = await consumer.getmany(p0, timeout_ms=1000, max_records=3)
            watch.fetched(consumer, batches, time.monotonic())
            got += sum(len(r) for r in batches.values())
            if got < 10:
                assert _lag(topic, 0) == 10 - got
        assert _lag(topic, 0) == 0
        assert _lag(topic, 1) is None  # nothing handed out yet: unknown, not 0

        # p0 grows, but only p1 is read: the fetcher learns p0's new end and hands none of it.
        for i in range(5):
            await producer.send(topic, b"late %d" % i, partition=0)
        await producer.send_and_wait(topic, b"other", partition=1)
        deadline = time.monotonic() + 10
        other = 0  # p0's new end can come with an answer before the one that carries p1's record
        while ((consumer.highwater(p0) or 0) <= 10 or not other) and time.monotonic() < deadline:
            batches = await consumer.getmany(p1, timeout_ms=50)
            other += len(batches.get(p1, []))
            watch.fetched(consumer, batches, time.monotonic())
        behind = (consumer.highwater(p0) or 0) - 10
        assert behind > 0
        watch.fetched(consumer, {}, time.monotonic())
        assert _lag(topic, 0) == behind  # set per fetch with records only, it stayed at 0
        assert _lag(topic, 1) == 0
        await asyncio.sleep(0.3)
        watch.fetched(consumer, {}, time.monotonic())  # behind for longer than stall_s
        late = 0
        while late < 5:
            batches = await consumer.getmany(p0, timeout_ms=1000)
            watch.fetched(consumer, batches, time.monotonic())
            late += sum(len(r) for r in batches.values())
        assert late == 5
        assert _lag(topic, 0) == 0
    finally:
        await consumer.stop()
        await producer.stop()


def test_lag_of_a_partition_handed_nothing(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="services.common.lag"):
        asyncio.run(_run(kafka_bootstrap, topic_prefix))
    said = [(r.levelno, r.getMessage(), getattr(r, "partition", None)) for r in caplog.records]
    assert (logging.WARNING, "consumer stalled: records to read, and the broker hands out none",
            0) in said  # fmt: skip
    assert (logging.INFO, "consumer resumed", 0) in said
    assert all(partition == 0 for _, _, partition in said)


async def _moved(bootstrap: str, prefix: str) -> None:
    """p0 is read here, revoked, grows while another member reads it, and comes back."""
    topic = prefix + "moved"
    await kafka.ensure_topics(CommonSettings(kafka_bootstrap=bootstrap, partitions=2), {topic: {}})
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5)
    await producer.start()
    await consumer.start()
    watch = LagWatch("lagtest", stall_s=0.2)
    try:
        for i in range(10):
            await producer.send_and_wait(topic, b"%d" % i, partition=0)
        consumer.assign([p0, p1])
        await consumer.seek_to_beginning(p0, p1)
        got = 0
        while got < 10:
            batches = await consumer.getmany(p0, timeout_ms=1000)
            watch.fetched(consumer, batches, time.monotonic())
            got += sum(len(r) for r in batches.values())
        assert _lag(topic, 0) == 0

        consumer.assign([p1])  # revoked
        watch.fetched(consumer, await consumer.getmany(timeout_ms=50), time.monotonic())
        assert _lag(topic, 0) is None  # the new owner's to show, not this one's last value

        for i in range(5):  # read by the other member meanwhile
            await producer.send_and_wait(topic, b"there %d" % i, partition=0)
        consumer.assign([p0, p1])  # back, where the other member left off
        consumer.seek(p0, 15)
        deadline = time.monotonic() + 10
        while consumer.highwater(p0) != 15 and time.monotonic() < deadline:
            watch.fetched(consumer, await consumer.getmany(timeout_ms=50), time.monotonic())
        assert consumer.highwater(p0) == 15
        await asyncio.sleep(0.3)  # longer than stall_s, with nothing to hand out
        watch.fetched(consumer, await consumer.getmany(timeout_ms=50), time.monotonic())
        assert _lag(topic, 0) is None  # not 5 behind from where this member stopped
    finally:
        await consumer.stop()
        await producer.stop()


def test_a_partition_that_moves_away_and_back(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="services.common.lag"):
        asyncio.run(_moved(kafka_bootstrap, topic_prefix))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no false stall


def _lags(service: str, topic: str) -> list[float]:
    """Each partition's lag that a stage has on /metrics for one topic."""
    return [
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "dosewatch_consumer_lag"
        for sample in metric.samples
        if sample.labels["service"] == service and sample.labels["topic"] == topic
    ]


async def _stages(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        await occupy(st, http)  # a ping through every stage to the API
        reads = {
            "ingest": "avl.pings.raw",
            "geofence": "avl.pings",
            "dosage": "dosage.visits",
            "api": "dosage.zone-status",
        }

        async def every_stage_current() -> bool:
            lags = [_lags(service, topic_prefix + topic) for service, topic in reads.items()]
            return all(lags) and not any(any(lag) for lag in lags)

        await wait_until(every_stage_current)


def test_every_stage_shows_its_lag_by_topic(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    """Each stage, the API's feed included, has its lag on /metrics, labelled by the topic it
    reads (the API reads two), and at 0 once the ping has gone through."""
    asyncio.run(_stages(kafka_bootstrap, database_url, topic_prefix))
