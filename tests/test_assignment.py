"""`kafka.start_consumer` on the real broker, with partitions taken by hand
(`consumer_assignment="all"`, as `dosewatch up` runs its stages): every partition at once, no
group to join; the group's commits resume where the listener does not seek, and the listener
places partitions before anything is fetched. With "group" the same call joins the group."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common import kafka
from services.common.settings import CommonSettings

PARTITIONS = 3
PER_PARTITION = 10


class _SeekFirst(kafka.ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks partition 0 to offset 5, as a stateful stage seeks to its saved offsets."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.assigned: list[TopicPartition] = []

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await asyncio.sleep(0.3)  # a slow state load: a fetch meanwhile would hand out p0 from 0
        self.assigned = list(assigned)
        for tp in assigned:
            if tp.partition == 0:
                self.consumer.seek(tp, 5)

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        return None


async def _first_offsets(consumer: AIOKafkaConsumer) -> dict[int, int]:
    """The first offset handed out for each partition, once every partition has given one."""
    first: dict[int, int] = {}
    async with asyncio.timeout(20):
        while len(first) < PARTITIONS:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                first.setdefault(tp.partition, records[0].offset)
    return first


async def _fill(bootstrap: str, topic: str) -> None:
    """PER_PARTITION records in each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for p in range(PARTITIONS):
            for i in range(PER_PARTITION):
                await producer.send(topic, b"%d" % i, partition=p)
        await producer.flush()
    finally:
        await producer.stop()


async def _run(bootstrap: str, prefix: str) -> None:
    topic = prefix + "assigned"
    settings = CommonSettings(
        kafka_bootstrap=bootstrap, topic_prefix=prefix, partitions=PARTITIONS,
        fetch_max_wait_ms=5, consumer_assignment="all",
    )  # fmt: skip
    await kafka.ensure_topics(settings, {topic: {}})
    await _fill(bootstrap, topic)

    # The group has committed partition 1 up to 3 (as ingest commits).
    committer = kafka.consumer(settings, "g")
    await committer.start()
    committer.assign([TopicPartition(topic, 1)])
    await committer.commit({TopicPartition(topic, 1): 3})
    await kafka.stop_client(committer)

    consumer = kafka.consumer(settings, "g")
    listener = _SeekFirst(consumer)
    await kafka.start_consumer(consumer, settings, topic, listener)
    try:
        want = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        assert sorted(consumer.assignment()) == want
        assert sorted(listener.assigned) == want
        # p0 where the listener put it, p1 from the group's commit, p2 from the start
        assert await _first_offsets(consumer) == {0: 5, 1: 3, 2: 0}
    finally:
        await kafka.stop_client(consumer)

    # "group": the same call joins the group, which hands over every partition (one member).
    grouped = settings.model_copy(update={"consumer_assignment": "group"})
    member = kafka.consumer(grouped, "g2")
    await kafka.start_consumer(member, grouped, topic)
    try:
        async with asyncio.timeout(20):
            while len(member.assignment()) < PARTITIONS:
                await member.getmany(timeout_ms=100)
        assert await _first_offsets(member) == {0: 0, 1: 0, 2: 0}
    finally:
        await kafka.stop_client(member)


async def _held(bootstrap: str, prefix: str, assignment: str) -> dict[str, object]:
    """A consumer opened ahead of a move (`kafka.Held`, as `prepare_move` opens one), on a
    topic whose group has commits: nothing while held, then every partition from offset 0."""
    topic = prefix + "held"
    settings = CommonSettings(
        kafka_bootstrap=bootstrap, topic_prefix=prefix, partitions=PARTITIONS,
        fetch_max_wait_ms=5, consumer_assignment=assignment,
    )  # fmt: skip
    await kafka.ensure_topics(settings, {topic: {}})
    await _fill(bootstrap, topic)
    # Commits that must not count: one inside the log, one at its end (a position there
    # would read only what comes later).
    committer = kafka.consumer(settings, "h")
    await committer.start()
    parts = [TopicPartition(topic, p) for p in (0, 1)]
    committer.assign(parts)
    await committer.commit({parts[0]: PER_PARTITION, parts[1]: 3})
    await kafka.stop_client(committer)

    held = kafka.Held()
    clients = await kafka.open_clients(settings, "h", topic, held.bind)
    held.hold()
    try:
        consumer = clients.consumer
        async with asyncio.timeout(20):
            while len(consumer.assignment()) < PARTITIONS:  # a group hands them over later
                await asyncio.sleep(0.05)
        while_held = await consumer.getmany(timeout_ms=300)
        held.release()
        return {"while_held": while_held, "first": await _first_offsets(consumer)}
    finally:
        await clients.close()


@pytest.mark.parametrize("assignment", ["all", "group"])
def test_a_held_consumer_reads_from_the_start_once_released(
    kafka_bootstrap: str, topic_prefix: str, assignment: str
) -> None:
    """Ingest's prepared consumer once took its position from the group's commits on the new
    broker and, now and then, read nothing until the next move (docs/performance.md,
    "Fifteenth round")."""
    out = asyncio.run(_held(kafka_bootstrap, topic_prefix, assignment))
    assert out["while_held"] == {}
    assert out["first"] == {0: 0, 1: 0, 2: 0}


def test_partitions_taken_by_hand(kafka_bootstrap: str, topic_prefix: str) -> None:
    asyncio.run(_run(kafka_bootstrap, topic_prefix))


def test_a_missing_topic_is_named(kafka_bootstrap: str, topic_prefix: str) -> None:
    async def run() -> None:
        settings = CommonSettings(kafka_bootstrap=kafka_bootstrap, consumer_assignment="all")
        consumer = kafka.consumer(settings, "g")
        with pytest.raises(RuntimeError, match=f"topic {topic_prefix}nowhere does not exist"):
            await kafka.start_consumer(consumer, settings, topic_prefix + "nowhere")
        assert consumer._closed  # stopped, not left fetching

    asyncio.run(run())


@pytest.mark.parametrize("value", ["group", "all"])
def test_the_setting_reads_from_the_environment(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOSEWATCH_CONSUMER_ASSIGNMENT", value)
    assert CommonSettings().consumer_assignment == value


def test_an_unknown_assignment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOSEWATCH_CONSUMER_ASSIGNMENT", "mine")
    with pytest.raises(ValueError, match="consumer_assignment"):
        CommonSettings()
