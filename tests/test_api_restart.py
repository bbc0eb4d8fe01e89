"""A replica that starts while pings are flowing catches up on the status topic and becomes
ready (pings never stop long enough for "a fetch came back empty"), with the statuses that
were produced before it started."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from services.api.service import ApiService
from services.api.settings import ApiSettings
from tests.api_helpers import api_stack, occupy, ping

OUTSIDE = (-73.90, 40.80)


async def _scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        await occupy(st, http)

        async def traffic() -> None:
            n = 0
            while True:  # a ping every 50 ms, from a unit far from every zone
                await st.send_pings([ping(f"car-far-{n % 5}", *OUTSIDE)])
                n += 1
                await asyncio.sleep(0.05)

        flow = asyncio.create_task(traffic())
        second = ApiService(ApiSettings(**st.settings, api_port=0))
        try:
            await asyncio.wait_for(second.start(), timeout=60)
            assert second.ctx is not None and second.ctx.ready
            assert second.ctx.book.zones["Z000"]["status"] == "active"
            assert second.ctx.book.zones["Z001"]["status"] == "due"
        finally:
            flow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flow
            await second.stop()


def test_a_replica_starting_under_traffic_becomes_ready(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, database_url, topic_prefix))
