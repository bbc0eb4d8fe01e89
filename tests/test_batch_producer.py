"""BatchProducer on the real broker: records land on their key's partition, in order, and
`wait=False` sends are acknowledged by `acked()` (what the services await before committing)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from services.common import kafka
from services.common.kafka import BatchProducer, partition_for


async def _run(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    out = BatchProducer(producer)
    try:
        keys = [f"u{i % 7}".encode() for i in range(300)]
        records = [(k, b"%d" % i) for i, k in enumerate(keys)]
        for start in range(0, 300, 50):
            assert await out.send(topic, records[start : start + 50], wait=False) == 50
        pending = out.take_unacked()
        assert pending, "unacknowledged sends are tracked"
        await asyncio.gather(*pending)
        assert out.take_unacked() == []
        await out.send(topic, [(b"u0", b"300")], wait=False)
        await out.acked()
        assert out.take_unacked() == []
        # settled: every send answered, waited for or not
        await out.send(topic, [(b"u1", b"301")], wait=False)
        unawaited = out.take_unacked()
        await out.settled()
        assert unawaited and all(f.done() for f in unawaited)
    finally:
        await producer.stop()
    # Where each partition's records end, from the acks: the offset after the last one.
    per_partition = [0, 0, 0]
    for k in [*keys, b"u0", b"u1"]:
        per_partition[partition_for(k, 3)] += 1
    assert out.ends_of(topic) == {p: n for p, n in enumerate(per_partition) if n}
    assert out.ends_of("another") == {}

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)  # fmt: skip
    await consumer.start()
    got: dict[bytes, list[int]] = {}
    try:
        while sum(len(v) for v in got.values()) < 302:
            for tp, batch in (await consumer.getmany(timeout_ms=1000)).items():
                for r in batch:
                    assert r.key is not None and r.value is not None
                    assert tp.partition == partition_for(r.key, 3)
                    got.setdefault(r.key, []).append(int(r.value))
    finally:
        await consumer.stop()
    for key, values in got.items():
        expected = [i for i, k in enumerate(keys) if k == key]
        expected += {b"u0": [300], b"u1": [301]}.get(key, [])
        assert values == expected  # one key's records keep their order across batches


def test_unawaited_sends_are_ordered_and_acknowledged(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    asyncio.run(_run(kafka_bootstrap, topic_prefix + "batch"))


def test_cached_partitioner_agrees_with_murmur2_also_after_the_cache_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Java client's partitioner, so that every producer agrees where a key lives; the
    cache of hashes is bounded and clearing it changes no answer."""
    monkeypatch.setattr(kafka, "_HASHES_MAX", 50)
    monkeypatch.setattr(kafka, "_HASHES", {})
    keys = [f"unit-{i:05d}".encode() for i in range(300)] + ["zone-ü".encode(), b""]
    for partitions in (1, 3, 4, 12):
        for key in keys * 2:
            assert partition_for(key, partitions) == (murmur2(key) & 0x7FFFFFFF) % partitions
    assert len(kafka._HASHES) <= 50
    # Kafka's own test vectors for murmur2 (UtilsTest), as signed 32-bit ints.
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    for key, hashed in java.items():
        assert partition_for(key, 1000) == (hashed & 0x7FFFFFFF) % 1000
