"""Deleting a zone leaves a tombstone on the compacted status topic: compaction can drop the
zone's last status, and every reader of the topic (the API included) learns it is gone."""

from __future__ import annotations

import asyncio

import httpx
from aiokafka import AIOKafkaConsumer

from tests.api_helpers import api_stack, occupy, wait_until


async def _scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        await occupy(st, http)
        r = await http.delete("/v1/zones/Z000", headers=st.headers("admin"))
        assert r.status_code in (200, 204), r.text

        async def gone() -> bool:
            r = await http.get("/v1/zones/Z000/status", headers=st.headers("dispatcher"))
            return r.status_code == 404

        await wait_until(gone)

        consumer = AIOKafkaConsumer(topic_prefix + "dosage.zone-status",
                                    bootstrap_servers=kafka_bootstrap,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=5)  # fmt: skip
        await consumer.start()
        values: list[bytes | None] = []
        try:

            async def tombstone() -> bool:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records if r.key == b"Z000")
                return bool(values) and values[-1] is None

            await wait_until(tombstone, timeout_s=30)
        finally:
            await consumer.stop()
        assert values[0] is not None  # its statuses came first, the tombstone last


def test_deleted_zone_gets_a_tombstone(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, database_url, topic_prefix))
