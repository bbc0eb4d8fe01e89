"""The services' consumers take records as aiokafka's fetch decodes them (`fetched`), on the
real broker: every record once, in order, with its offset, timestamp, key and value, also when
a fetch is handed out a few records at a time; other consumers still get `ConsumerRecord`s."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from services.common import kafka
from services.common.fetched import FetchedRecord
from services.common.settings import CommonSettings

COUNT = 500


async def _drain(consumer: AIOKafkaConsumer, count: int) -> list[FetchedRecord]:
    got: list[FetchedRecord] = []
    while len(got) < count:
        for batch in (await consumer.getmany(timeout_ms=1000)).values():
            got.extend(batch)
    return got


async def _run(bootstrap: str, prefix: str) -> None:
    topic = prefix + "fetched"
    await kafka.ensure_topics(CommonSettings(kafka_bootstrap=bootstrap, partitions=1), {topic: {}})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = []
        for i in range(COUNT):
            key = None if i % 5 == 1 and i % 7 else b"k%d" % (i % 3)
            value = None if i % 7 == 0 else b'{"n":%d}' % i
            sent.append((key, value, 1_780_000_000_000 + i))
        for key, value, ts in sent:
            await producer.send(topic, value, key=key, timestamp_ms=ts)
        await producer.flush()
    finally:
        await producer.stop()

    # A few records per getmany: a fetch is handed out over several calls.
    settings = CommonSettings(
        kafka_bootstrap=bootstrap, topic_prefix=prefix, fetch_max_wait_ms=5, max_poll_records=7
    )
    ours = kafka.consumer(settings, "fetched")
    plain = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             fetch_max_wait_ms=5, max_poll_records=7)  # fmt: skip
    await asyncio.gather(kafka.start_consumer(ours, settings, topic), plain.start())
    try:
        light, full = await asyncio.gather(_drain(ours, COUNT), _drain(plain, COUNT))
    finally:
        await asyncio.gather(ours.stop(), plain.stop())

    assert [(r.key, r.value, r.timestamp) for r in light] == sent
    assert [r.offset for r in light] == list(range(COUNT))
    assert not any(isinstance(r, ConsumerRecord) for r in light)  # no copy per record
    assert all(isinstance(r, ConsumerRecord) for r in full)
    assert [(r.offset, r.key, r.value, r.timestamp) for r in full] == [
        (r.offset, r.key, r.value, r.timestamp) for r in light
    ]


def test_records_as_fetched(kafka_bootstrap: str, topic_prefix: str) -> None:
    asyncio.run(_run(kafka_bootstrap, topic_prefix))
