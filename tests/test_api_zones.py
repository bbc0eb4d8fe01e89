"""Zone management over real HTTP, with the whole pipeline behind the API: writes make a
version, an audit event and a live change the geofence and dosage pick up; inputs the rules
cannot use are refused with a reason, never a 500."""

from __future__ import annotations

import asyncio
import copy
import math
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from services.api import keys
from tests.api_helpers import Stack, api_stack, ping, wait_until
from tests.pipeline_helpers import TZ

# East of the sample's zones, so a ping here is in the new zone only.
WEST, SOUTH, EAST, NORTH = -73.976, 40.705, -73.973, 40.707
INSIDE = (-73.9745, 40.706)
UNIT = "u-zones-1"


def square(w: float, s: float, e: float, n: float) -> list[list[list[float]]]:
    return [[[w, s], [e, s], [e, n], [w, n], [w, s]]]


def zone(zone_id: str | None, **properties: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "Feature",
        "properties": {"name": f"Zone {zone_id}", **properties},
        "geometry": {"type": "Polygon", "coordinates": square(WEST, SOUTH, EAST, NORTH)},
    }
    if zone_id is not None:
        doc["id"] = zone_id
    return doc


def circle(zone_id: str, vertices: int) -> dict[str, Any]:
    ring = [
        [-73.96 + 0.001 * math.cos(2 * math.pi * k / vertices),
         40.70 + 0.001 * math.sin(2 * math.pi * k / vertices)]
        for k in range(vertices)
    ]  # fmt: skip
    doc = zone(zone_id)
    doc["geometry"]["coordinates"] = [[*ring, ring[0]]]
    return doc


def key_id(st: Stack, role: str) -> str:
    parts = keys.split_token(st.tokens[role])
    assert parts is not None
    return parts[0]


async def _scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix, max_zone_vertices=50) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        admin, dispatcher = st.headers("admin"), st.headers("dispatcher")

        # -- reading: every role, paged; the CLI's import is version 1 of each zone
        assert (await http.get("/v1/zones")).status_code == 401
        r = await http.get("/v1/zones", headers=st.headers("auditor"))
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["total"] == 12 and len(page["zones"]) == 12
        assert page["zones"][0]["zone_id"] == "Z000" and page["zones"][0]["version"] == 1
        r = await http.get("/v1/zones", params={"limit": 5, "offset": 10},
                           headers=st.headers("mdt"))  # fmt: skip
        assert [z["zone_id"] for z in r.json()["zones"]] == ["Z010", "Z011"]
        r = await http.get("/v1/zones/Z000", headers=dispatcher)
        assert r.status_code == 200 and r.headers["etag"] == '"1"'
        assert r.json()["feature"]["properties"]["min_visit_s"] == 30
        r = await http.get("/v1/zones/Z000/versions", headers=dispatcher)
        assert [(v["version"], v["op"], v["changed_by"]) for v in r.json()["versions"]] == [
            (1, "create", "cli")
        ]
        assert (await http.get("/v1/zones/nope", headers=dispatcher)).status_code == 404

        # -- writing is for admins
        r = await http.post("/v1/zones", json=zone("NEW1"), headers=dispatcher)
        assert r.status_code == 403
        r = await http.post("/v1/zones", json={"not": "a zone"}, headers=st.headers("auditor"))
        assert r.status_code == 403  # the role is refused before the body is looked at
        assert (await http.delete("/v1/zones/Z000", headers=dispatcher)).status_code == 403
        assert (await http.post("/v1/zones", json=zone("NEW1"))).status_code == 401

        # -- create; the geofence picks it up live: a ping inside makes it active
        r = await http.post("/v1/zones", json=zone("NEW1", target_s=600), headers=admin)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.headers["location"] == "/v1/zones/NEW1"
        r = await http.post("/v1/zones", json=zone("NEW1"), headers=admin)
        assert r.status_code == 409

        async def active() -> Any:
            await st.send_pings([ping(UNIT, *INSIDE)])
            r = await http.get("/v1/zones/NEW1/status", headers=dispatcher)
            return r.status_code == 200 and r.json()["status"] == "active" and r.json()

        status = await wait_until(active)
        assert status["units_present"] == [UNIT] and status["target_s"] == 600

        # -- update: the id may be left out; If-Match guards against lost updates
        r = await http.put("/v1/zones/NEW1", json=zone(None, target_s=700),
                           headers=admin | {"If-Match": '"1"'})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2 and r.headers["etag"] == '"2"'
        r = await http.put("/v1/zones/NEW1", json=zone("NEW1", target_s=800),
                           headers=admin | {"If-Match": "1"})  # fmt: skip
        assert r.status_code == 412
        r = await http.put("/v1/zones/NEW1", json=zone("OTHER"), headers=admin)
        assert r.status_code == 422 and "OTHER" in r.text
        r = await http.put("/v1/zones/NONE", json=zone(None), headers=admin)
        assert r.status_code == 404
        r = await http.put("/v1/zones/NEW1", json=zone(None, target_s=700), headers=admin)
        assert r.json()["version"] == 2  # nothing changed: no new version

        # -- refused input: a reason each, never a 500
        r = await http.post("/v1/zones", json=circle("BIG", 60), headers=admin)
        assert r.status_code == 422 and "61 vertices; at most 50" in r.json()["detail"]
        bowtie = zone("BOW")
        bowtie["geometry"]["coordinates"] = [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]
        r = await http.post("/v1/zones", json=bowtie, headers=admin)
        assert r.status_code == 422 and "Self-intersection" in r.text
        for bad in (
            [{"days": ["mon"], "start": "18:00", "end": "18:00"}],
            [{"days": ["someday"], "start": "18:00", "end": "02:00"}],
            [{"days": ["mon"], "start": "6pm", "end": "02:00"}],
            [],
            "weeknights",
        ):
            r = await http.post("/v1/zones", json=zone("SCH", schedule=bad), headers=admin)
            assert r.status_code == 422 and "schedule" in r.text, (bad, r.text)
        r = await http.post("/v1/zones", json=zone("LIM", target_s=1500), headers=admin)
        assert r.status_code == 422 and "max_visit_s (1200)" in r.text
        r = await http.post("/v1/zones", json=zone("LIM", min_visit_s=300, target_s=200),
                            headers=admin)  # fmt: skip
        assert r.status_code == 422 and "min_visit_s (300)" in r.text
        r = await http.post("/v1/zones", content=b'{"type": "Feature", ', headers=admin)
        assert r.status_code == 422
        r = await http.post("/v1/zones", json=zone("NUL", name="a\x00b"), headers=admin)
        assert r.status_code == 422 and "NUL" in r.text
        r = await http.post("/v1/zones", json=zone("status"), headers=admin)
        assert r.status_code == 422 and "reserved" in r.text

        # -- import: all or nothing, with a reason per feature
        changed = copy.deepcopy((await http.get("/v1/zones/Z001", headers=admin)).json())
        z001 = changed["feature"]
        z001["properties"]["district"] = "7th"
        new2 = zone("NEW2")
        new2["geometry"]["coordinates"] = square(-73.972, 40.705, -73.970, 40.707)
        doc = {"type": "FeatureCollection", "features": [new2, z001, bowtie, circle("C", 60)]}
        r = await http.post("/v1/zones/import", json=doc, headers=admin)
        assert r.status_code == 422, r.text
        assert [(e["index"], e["zone_id"]) for e in r.json()["errors"]] == [(2, "BOW"), (3, "C")]
        assert "vertices" in r.json()["errors"][1]["reason"]
        assert (await http.get("/v1/zones/NEW2", headers=admin)).status_code == 404
        doc["features"] = [new2, z001, (await http.get("/v1/zones/Z002", headers=admin)).json()
                           ["feature"]]  # fmt: skip
        r = await http.post("/v1/zones/import", json=doc, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "written": [
                {"zone_id": "NEW2", "version": 1, "op": "create"},
                {"zone_id": "Z001", "version": 2, "op": "update"},
            ],
            "unchanged": 1,
        }

        # -- delete: soft, a version of its own; the history stays readable
        r = await http.delete("/v1/zones/NEW1", headers=admin | {"If-Match": "1"})
        assert r.status_code == 412
        r = await http.delete("/v1/zones/NEW1", headers=admin | {"If-Match": "2"})
        assert r.status_code == 200 and r.json() == {"zone_id": "NEW1", "version": 3,
                                                     "op": "delete"}  # fmt: skip
        r = await http.get("/v1/zones/NEW1", headers=admin)
        assert r.status_code == 404 and "deleted" in r.text
        assert (await http.delete("/v1/zones/NEW1", headers=admin)).status_code == 404
        r = await http.get("/v1/zones/NEW1/versions", headers=st.headers("auditor"))
        history = r.json()["versions"]
        admin_id = key_id(st, "admin")
        assert [(v["version"], v["op"], v["changed_by"]) for v in history] == [
            (1, "create", admin_id), (2, "update", admin_id), (3, "delete", admin_id)
        ]  # fmt: skip
        assert [v["feature"]["properties"]["target_s"] for v in history] == [600, 700, 700]
        assert history[0]["changed_at"] < history[1]["changed_at"] < history[2]["changed_at"]
        r = await http.get("/v1/zones", headers=admin)
        assert r.json()["total"] == 13 and "NEW1" not in {z["zone_id"] for z in r.json()["zones"]}
        # created again after the delete: it carries on from its history
        r = await http.post("/v1/zones", json=zone("NEW1"), headers=admin)
        assert r.status_code == 201 and r.json()["version"] == 4

        # -- every write is in the audit log, with who made it
        rows = await st.pool.fetch(
            "SELECT type, subject, actor, event->'data' AS data FROM audit_log "
            "WHERE type = 'dosewatch.zone.edited' AND actor = $1 ORDER BY seq",
            admin_id,
        )
        assert [(r["type"], r["subject"]) for r in rows] == [
            ("dosewatch.zone.edited", z)
            for z in ("NEW1", "NEW1", "NEW2", "Z001", "NEW1", "NEW1")
        ]  # fmt: skip
        versions = await st.pool.fetchval("SELECT count(*) FROM zone_versions")
        edited = await st.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE type = 'dosewatch.zone.edited'"
        )
        assert versions == edited == 12 + 6  # the CLI's import is recorded as well


async def _schedule_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    """A zone whose window is hours away is inactive now, yet a unit in it is still seen."""
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
    ):
        opens = datetime.now(ZoneInfo(TZ["tz"])) + timedelta(hours=6)
        closes = opens + timedelta(minutes=1)
        every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        window = {"days": every_day, "start": f"{opens:%H:%M}", "end": f"{closes:%H:%M}"}
        r = await http.post("/v1/zones", json=zone("LATE", schedule=[window]),
                            headers=st.headers("admin"))  # fmt: skip
        assert r.status_code == 201, r.text
        assert r.json()["feature"]["properties"]["schedule"] == [window]

        async def inactive_with_unit() -> Any:
            await st.send_pings([ping(UNIT, *INSIDE)])
            r = await http.get("/v1/zones/LATE/status", headers=st.headers("dispatcher"))
            body = r.json() if r.status_code == 200 else {}
            return body.get("status") == "inactive" and body["units_present"] == [UNIT]

        assert await wait_until(inactive_with_unit)


def test_zone_crud_versions_audit_and_live_pickup(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, database_url, topic_prefix))


def test_a_scheduled_zone_outside_its_window_is_inactive(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_schedule_scenario(kafka_bootstrap, database_url, topic_prefix))
