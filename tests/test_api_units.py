"""The API wired to the real pipeline: a ping becomes zone status over REST, an MDT polls its
unit (200 then 304), and credentials and roles are enforced."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.api_helpers import MDT_UNIT, api_stack, ping, wait_until

INSIDE_Z000 = (-73.99308646946923, 40.71047563789939)


async def _scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        # Before anything happens every zone is due.
        r = await http.get("/v1/zones/status", headers=st.headers("dispatcher"))
        assert r.status_code == 200
        before = {z["zone_id"]: z for z in r.json()["zones"]}
        assert len(before) == 12 and before["Z000"]["status"] == "due"

        await st.send_pings([ping(MDT_UNIT, *INSIDE_Z000)])

        async def active() -> Any:
            r = await http.get("/v1/zones/Z000/status", headers=st.headers("dispatcher"))
            return r.json() if r.status_code == 200 and r.json()["status"] == "active" else None

        status = await wait_until(active)
        assert status["units_present"] == [MDT_UNIT]
        assert status["units"][0]["unit_id"] == MDT_UNIT

        # The MDT: its unit is in Z000, with the due zones nearest to it.
        url = f"/v1/units/{MDT_UNIT}/status"
        r = await http.get(url, headers=st.headers("mdt"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["last_fix"]["lat"] == INSIDE_Z000[1]
        assert [z["zone_id"] for z in body["zones"]] == ["Z000"]
        assert body["zones"][0]["status"] == "active"
        assert 0 < len(body["nearest_due"]) <= 5
        assert all(z["zone_id"] != "Z000" for z in body["nearest_due"])
        distances = [z["distance_m"] for z in body["nearest_due"]]
        assert distances == sorted(distances) and distances[0] > 0
        etag = r.headers["etag"]
        again = await http.get(url, headers=st.headers("mdt") | {"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""

        # An MDT sees that a zone is occupied, but not which other units are where.
        await st.send_pings([ping("car-9", *INSIDE_Z000)])

        async def both() -> Any:
            r = await http.get("/v1/zones/Z000/status", headers=st.headers("dispatcher"))
            return r.json()["units_present"] == sorted(["car-9", MDT_UNIT])

        await wait_until(both)
        seen = (await http.get("/v1/zones/Z000/status", headers=st.headers("mdt"))).json()
        assert seen["units_present"] == [MDT_UNIT] and seen["units_count"] == 2
        listed = (await http.get("/v1/zones/status", headers=st.headers("mdt"))).json()
        assert "car-9" not in str(listed)

        # Status filters.
        r = await http.get("/v1/zones/status", params={"status": "active"},
                           headers=st.headers("dispatcher"))  # fmt: skip
        assert [z["zone_id"] for z in r.json()["zones"]] == ["Z000"]
        r = await http.get("/v1/zones/status", params={"bbox": "1,2,3"},
                           headers=st.headers("dispatcher"))  # fmt: skip
        assert r.status_code == 422 and "bbox" in r.text

        # Credentials and roles.
        assert (await http.get(url)).status_code == 401
        bad = {"Authorization": "Bearer dw_nope_nope"}
        assert (await http.get(url, headers=bad)).status_code == 401
        other = await http.get("/v1/units/someone-else/status", headers=st.headers("mdt"))
        assert other.status_code == 403
        assert (await http.get(url, headers=st.headers("auditor"))).status_code == 403
        assert (await http.get(url, headers=st.headers("dispatcher"))).status_code == 200

        # Polling is rate limited per credential: a burst, then 429 with Retry-After.
        codes = [
            (await http.get("/v1/zones/Z000/status", headers=st.headers("auditor"))).status_code
            for _ in range(st.api.settings.poll_burst + 5)
        ]
        assert codes[0] == 200 and codes[-1] == 429
        limited = await http.get("/v1/zones/Z000/status", headers=st.headers("auditor"))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # Another credential has its own bucket; a refused role is told 403, not 429.
        mine = await http.get("/v1/zones/Z000/status", headers=st.headers("dispatcher"))
        assert mine.status_code == 200
        refused = await http.get(url, headers=st.headers("auditor"))
        assert refused.status_code == 403


def test_ping_to_status_and_mdt_polling(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, database_url, topic_prefix))
