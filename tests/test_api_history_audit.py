"""History and audit over HTTP, against the API wired to the real pipeline: the evening-shift
sample is replayed through ingest -> geofence -> dosage, and what the API pages out (JSON and
CSV) is compared with the tables it reads. The audit chain is tampered with as an attacker with
database access would, and both /v1/audit/verify and `dosewatch audit verify` must say where.
A role matrix over every /v1 REST operation in the app's OpenAPI document closes."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaProducer

from schemas.timefmt import datetime_to_ms, format_ts
from services.api import keys
from services.api.app import create_app
from services.common.kafka import BatchProducer
from tests.api_helpers import MDT_UNIT, Stack, api_stack, ping, wait_until
from tests.pipeline_helpers import Expected, keyed, replay_expected

INSIDE_Z000 = (-73.99308646946923, 40.71047563789939)
MAX_PAGE = 50  # small, so the cap is exercised by the sample's few hundred rows


async def replay_sample(st: Stack, expected: Expected) -> None:
    """The sample (and flush pings) onto the raw topic; wait for its history to be written."""
    producer = AIOKafkaProducer(bootstrap_servers=st.settings["kafka_bootstrap"], linger_ms=5)
    await producer.start()
    try:
        await BatchProducer(producer).send(
            st.settings["topic_prefix"] + "avl.pings.raw", keyed(expected.lines)
        )
    finally:
        await producer.stop()

    async def written() -> bool:
        # Visits, their zone periods and their audit events are saved in one transaction.
        n = await st.pool.fetchval("SELECT count(*) FROM visits")
        return bool(n == len(expected.visits))

    await wait_until(written, timeout_s=120)


def _ts(value: datetime) -> str:
    return format_ts(datetime_to_ms(value))


def _json_row(record: asyncpg.Record) -> dict[str, Any]:
    return {k: _ts(v) if isinstance(v, datetime) else v for k, v in record.items()}


VISIT_COLUMNS = ("unit_id, zone_id, started_at, ended_at, duration_s, end_reason, qualified, "
                 "target_met, overstay")  # fmt: skip
PERIOD_COLUMNS = "zone_id, period_start, period_end, presence_s, officer_s, visits, dosed_visits"


async def table(pool: asyncpg.Pool, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [_json_row(r) for r in await pool.fetch(sql, *args)]


async def pages(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every row, following next_cursor; and how many pages it took."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    n = 0
    while True:
        q = dict(params) | ({"cursor": cursor} if cursor else {})
        r = await http.get(url, params=q, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        n += 1
        assert len(body["rows"]) <= min(params.get("limit", 100), MAX_PAGE)
        rows += body["rows"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, n


def _csv_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def csv_rows(text: str, header: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text))
    head = next(reader)
    assert head == [c.strip() for c in header.split(",")]
    return [dict(zip(head, line, strict=True)) for line in reader]


def as_csv(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: _csv_text(v) for k, v in row.items()} for row in rows]


async def _history(kafka_bootstrap: str, database_url: str, topic_prefix: str,
                   expected: Expected) -> None:  # fmt: skip
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix, max_page=MAX_PAGE) as st,
        httpx.AsyncClient(base_url=st.base, timeout=30) as http,
    ):
        await replay_sample(st, expected)
        h = st.headers("dispatcher")
        order_v = " ORDER BY started_at, unit_id, zone_id"
        order_p = " ORDER BY zone_id, period_start"

        # Everything, in pages: exactly the table, in a stable order, with replay's fields.
        all_visits = await table(st.pool, f"SELECT {VISIT_COLUMNS} FROM visits{order_v}")
        assert len(all_visits) == len(expected.visits)
        got, n = await pages(http, "/v1/history/visits", h, limit=17)
        assert got == all_visits and n == -(-len(all_visits) // 17)
        assert sorted(got, key=lambda r: (r["started_at"], r["unit_id"], r["zone_id"])) == \
            expected.visits  # fmt: skip

        # The cap: a page never exceeds max_page, whatever the limit asks.
        r = await http.get("/v1/history/visits", params={"limit": 10_000}, headers=h)
        assert len(r.json()["rows"]) == MAX_PAGE and r.json()["next_cursor"]
        got, _ = await pages(http, "/v1/history/visits", h, limit=10_000)
        assert got == all_visits

        # Filters: zone, unit, a time window (offset form too), and all together.
        busiest = max({v["zone_id"] for v in all_visits},
                      key=lambda z: sum(v["zone_id"] == z for v in all_visits))  # fmt: skip
        want = await table(st.pool, f"SELECT {VISIT_COLUMNS} FROM visits WHERE zone_id = $1"
                           + order_v, busiest)  # fmt: skip
        got, _ = await pages(http, "/v1/history/visits", h, zone_id=busiest, limit=5)
        assert got == want and len(want) > 5

        unit = all_visits[0]["unit_id"]
        start, end = datetime.fromisoformat("2026-05-14T19:00:00+00:00"), \
            datetime.fromisoformat("2026-05-14T21:30:00+00:00")  # fmt: skip
        want = await table(st.pool, f"SELECT {VISIT_COLUMNS} FROM visits WHERE unit_id = $1 "
                           "AND started_at >= $2 AND started_at < $3" + order_v,
                           unit, start, end)  # fmt: skip
        assert want
        window = {"from": "2026-05-14T19:00:00Z", "to": "2026-05-14T21:30:00Z"}
        got, _ = await pages(http, "/v1/history/visits", h, unit_id=unit, limit=4, **window)
        assert got == want
        got, _ = await pages(http, "/v1/history/visits", h, unit_id=unit, limit=4,
                             **{"from": "2026-05-14T15:00:00-04:00",
                                "to": "2026-05-14T17:30:00.000-04:00"})  # fmt: skip
        assert got == want
        zone = want[0]["zone_id"]
        got, _ = await pages(http, "/v1/history/visits", h, unit_id=unit, zone_id=zone,
                             **window)  # fmt: skip
        assert got == [v for v in want if v["zone_id"] == zone]
        r = await http.get("/v1/history/visits", params={"zone_id": "no-such-zone"}, headers=h)
        assert r.json() == {"rows": [], "next_cursor": None}

        # Zone periods the same way.
        all_periods = await table(st.pool, f"SELECT {PERIOD_COLUMNS} FROM zone_periods{order_p}")
        assert len(all_periods) == len(expected.periods)
        got, _ = await pages(http, "/v1/history/zone-periods", h, limit=4)
        assert got == all_periods == expected.periods
        zone = all_periods[-1]["zone_id"]
        got, _ = await pages(http, "/v1/history/zone-periods", h, zone_id=zone, limit=1)
        assert got == [p for p in all_periods if p["zone_id"] == zone]
        first = min(p["period_start"] for p in all_periods)
        got, _ = await pages(http, "/v1/history/zone-periods", h, limit=3,
                             **{"from": first, "to": first})  # fmt: skip
        assert got == []
        got, _ = await pages(http, "/v1/history/zone-periods", h, limit=3, to=first)
        assert got == []
        got, _ = await pages(http, "/v1/history/zone-periods", h, limit=3, **{"from": first})
        assert got == all_periods

        # CSV: without limit the whole selection streams, header first, same fields and values.
        r = await http.get("/v1/history/visits", params={"format": "csv"}, headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert csv_rows(r.text, VISIT_COLUMNS) == as_csv(all_visits)
        r = await http.get("/v1/history/zone-periods", headers=h | {"Accept": "text/csv"})
        assert csv_rows(r.text, PERIOD_COLUMNS) == as_csv(all_periods)
        # With a limit, CSV pages like JSON, the cursor in a header (absent on the last page).
        got_csv: list[dict[str, str]] = []
        cursor: str | None = None
        while True:
            params = {"format": "csv", "limit": 40, "zone_id": busiest}
            r = await http.get("/v1/history/visits",
                               params=params | ({"cursor": cursor} if cursor else {}),
                               headers=h)  # fmt: skip
            assert r.status_code == 200, r.text
            page = csv_rows(r.text, VISIT_COLUMNS)
            assert len(page) <= 40
            got_csv += page
            cursor = r.headers.get("x-next-cursor")
            if cursor is None:
                break
        assert got_csv == as_csv([v for v in all_visits if v["zone_id"] == busiest])
        # The JSON cursor and the CSV one are the same thing: CSV resumes a JSON page.
        r = await http.get("/v1/history/visits", params={"limit": 7}, headers=h)
        cursor = r.json()["next_cursor"]
        r = await http.get("/v1/history/visits", params={"format": "csv", "cursor": cursor},
                           headers=h)  # fmt: skip
        assert csv_rows(r.text, VISIT_COLUMNS) == as_csv(all_visits[7:])

        # Malformed requests: 422 that says what is wrong, never a 500.
        async def problem(url: str, **params: Any) -> str:
            r = await http.get(url, params=params, headers=h)
            assert r.status_code == 422, (params, r.status_code, r.text)
            return r.text

        text = await problem("/v1/history/visits", **{"from": "yesterday"})
        assert "query.from" in text and "RFC 3339" in text
        text = await problem("/v1/history/visits", to="2026-05-14T18:00:00")  # no offset
        assert "query.to" in text and "RFC 3339" in text
        text = await problem("/v1/history/visits", to="2026-02-30T18:00:00Z")
        assert "query.to" in text and "not a valid date" in text
        for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            text = await problem("/v1/history/visits", **{"from": edge})
            assert "query.from" in text and "out of range" in text
        text = await problem("/v1/history/visits", to="2026-05-14T18:00:00 04:00")
        assert "%2B" in text  # an unencoded '+' became a space
        backwards = {"from": "2026-05-15T00:00:00Z", "to": "2026-05-14T00:00:00Z"}
        text = await problem("/v1/history/zone-periods", **backwards)
        assert "query.to" in text and "before" in text
        text = await problem("/v1/history/visits", cursor="not-a-cursor")
        assert "query.cursor" in text
        visits_cursor = (await http.get("/v1/history/visits", params={"limit": 1},
                                        headers=h)).json()["next_cursor"]  # fmt: skip
        text = await problem("/v1/history/zone-periods", cursor=visits_cursor)
        assert "query.cursor" in text
        for bad_limit in ("0", "-1", "ten"):
            assert "query.limit" in await problem("/v1/history/visits", limit=bad_limit)
        assert "query.format" in await problem("/v1/history/visits", format="xml")
        assert "query.zone_id" in await problem("/v1/history/visits", zone_id="Z\x00")
        assert "query.unit_id" in await problem("/v1/history/visits", unit_id="")


def test_history_filters_paging_and_csv(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    expected = replay_expected(tmp_path)
    asyncio.run(_history(kafka_bootstrap, database_url, topic_prefix, expected))


# -- audit ---------------------------------------------------------------------------------


async def audit_table(pool: asyncpg.Pool, upto: int) -> list[dict[str, Any]]:
    records = await pool.fetch(
        "SELECT seq, encode(hash, 'hex') AS hash, event::text AS body FROM audit_log "
        "WHERE seq <= $1 ORDER BY seq",
        upto,
    )
    return [{"seq": r["seq"], "hash": r["hash"], "event": orjson.loads(r["body"])}
            for r in records]  # fmt: skip


async def read_pages(
    http: httpx.AsyncClient, headers: dict[str, str], after: int, limit: int, max_pages: int
) -> tuple[list[dict[str, Any]], int, bool]:
    """Up to max_pages pages from `after`: the entries, where to resume, and whether more wait."""
    got: list[dict[str, Any]] = []
    more = True
    for _ in range(max_pages):
        r = await http.get("/v1/audit/events", params={"after": after, "limit": limit},
                           headers=headers)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["events"]) <= limit
        assert [e["seq"] for e in body["events"]] == sorted(e["seq"] for e in body["events"])
        assert all(e["seq"] > after for e in body["events"])
        got += body["events"]
        after, more = body["next_after"], body["has_more"]
        if not more:
            break
    return got, after, more


async def cli_verify(database_url: str) -> tuple[int, str]:
    env = dict(os.environ, DOSEWATCH_DATABASE_URL=database_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dosewatch.cli", "audit", "verify", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def tamper(pool: asyncpg.Pool, sql: str, *args: Any) -> None:
    """What someone with write access to the database could do: lift the append-only trigger
    (only inside this transaction), change a row, put the trigger back."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
        await conn.execute(sql, *args)
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change")


async def _audit(kafka_bootstrap: str, database_url: str, topic_prefix: str,
                 expected: Expected) -> None:  # fmt: skip
    async with api_stack(kafka_bootstrap, database_url, topic_prefix, max_page=MAX_PAGE) as st:
        await replay_sample(st, expected)
        h = st.headers("auditor")
        total = await st.pool.fetchval("SELECT count(*) FROM audit_log")
        assert total > 100

        # An auditor reads a few small pages, then goes away mid-log.
        async with httpx.AsyncClient(base_url=st.base, timeout=30) as first:
            got, after, more = await read_pages(first, h, 0, 7, 5)
        assert len(got) == 35 and more

        # Meanwhile the log grows: a key operation (written by the API's own code) and a live
        # visit (through the whole pipeline).
        async with st.pool.acquire() as conn:
            await keys.create_key(conn, "dispatcher", None, "between pages", "test", "t")
        await st.send_pings([ping(MDT_UNIT, *INSIDE_Z000)])

        async def live_visit_logged() -> Any:
            return await st.pool.fetchval(
                "SELECT seq FROM audit_log WHERE type = 'dosewatch.visit.started' "
                "AND event->'data'->>'unit_id' = $1", MDT_UNIT,
            )  # fmt: skip

        live_seq = await wait_until(live_visit_logged)

        # A new client resumes from the cursor and reads to the end (pages bigger than the cap
        # are cut to it).
        async with httpx.AsyncClient(base_url=st.base, timeout=30) as second:
            rest, after, more = await read_pages(second, h, after, 1000, 10_000)
        assert not more
        union = got + rest
        # seq is assigned in commit order: every row up to the last one read is in the union,
        # once, and it is exactly the table there. Rows still arriving (wall-clock status
        # changes) come after it.
        assert union == await audit_table(st.pool, after)
        seqs = [e["seq"] for e in union]
        assert len(set(seqs)) == len(seqs) and live_seq in seqs
        labels = [e["event"]["data"].get("label") for e in union
                  if e["event"]["type"] == "dosewatch.key.created"]  # fmt: skip
        assert "between pages" in labels
        async with httpx.AsyncClient(base_url=st.base, timeout=60) as http:
            # Nothing new: the same next_after comes back, so a follower can poll with it.
            r = await http.get("/v1/audit/events", params={"after": 2**63 - 1}, headers=h)
            assert r.json() == {"events": [], "next_after": 2**63 - 1, "has_more": False}
            r = await http.get("/v1/audit/events", params={"after": 2**63}, headers=h)
            assert r.status_code == 422 and "query.after" in r.text

            async def verify() -> dict[str, Any]:
                r = await http.get("/v1/audit/verify", headers=h)
                assert r.status_code == 200, r.text
                report: dict[str, Any] = r.json()
                return report

            report = await verify()
            assert report["ok"] and report["rows"] >= len(union) and report["bad_seq"] is None
            code, out = await cli_verify(database_url)
            assert code == 0 and "intact" in out, out

            # A row from the middle of the log, with rows after it.
            victim = union[len(union) // 2]["seq"]
            successor = union[len(union) // 2 + 1]["seq"]
            original = await st.pool.fetchval(
                "SELECT event::text FROM audit_log WHERE seq = $1", victim
            )

            # 1. The event is edited: that row's hash no longer matches.
            await tamper(st.pool, "UPDATE audit_log SET event = jsonb_set(event, '{time}', "
                         "'\"2020-01-01T00:00:00.000Z\"') WHERE seq = $1", victim)  # fmt: skip
            report = await verify()
            assert not report["ok"] and report["bad_seq"] == victim, report
            assert "altered" in report["error"]
            code, out = await cli_verify(database_url)
            assert code == 1 and f"seq {victim}:" in out, out

            await tamper(st.pool, "UPDATE audit_log SET event = $2::jsonb WHERE seq = $1",
                         victim, original)  # fmt: skip
            assert (await verify())["ok"]

            # 2. The hash is rewritten: a made-up one, then one recomputed to fit an edited
            # event (the row then checks out, and the next row's link gives it away).
            await tamper(st.pool, "UPDATE audit_log SET hash = sha256(hash) WHERE seq = $1",
                         victim)  # fmt: skip
            report = await verify()
            assert not report["ok"] and report["bad_seq"] == victim, report
            code, out = await cli_verify(database_url)
            assert code == 1 and f"seq {victim}:" in out, out

            await tamper(
                st.pool,
                "UPDATE audit_log SET event = jsonb_set(event, '{subject}', '\"forged\"') "
                "WHERE seq = $1",
                victim,
            )
            await tamper(
                st.pool,
                "UPDATE audit_log SET hash = sha256(prev_hash || convert_to(seq::text || '|' "
                "|| event_id || '|' || event::text, 'UTF8')) WHERE seq = $1",
                victim,
            )
            report = await verify()
            assert not report["ok"] and report["bad_seq"] == successor, report
            assert "broken link" in report["error"]
            code, out = await cli_verify(database_url)
            assert code == 1 and f"seq {successor}:" in out, out

            # Back as it was (the chain heals once the row and its hash are the originals).
            await tamper(
                st.pool,
                "UPDATE audit_log SET event = $2::jsonb, hash = sha256(prev_hash || "
                "convert_to(seq::text || '|' || event_id || '|' || $2::jsonb::text, 'UTF8')) "
                "WHERE seq = $1",
                victim,
                original,
            )
            assert (await verify())["ok"]

            # 3. The row is deleted: the next row's link points at a row that is not there.
            await tamper(st.pool, "DELETE FROM audit_log WHERE seq = $1", victim)
            report = await verify()
            assert not report["ok"] and report["bad_seq"] == successor, report
            code, out = await cli_verify(database_url)
            assert code == 1 and f"seq {successor}:" in out, out


def test_audit_paging_resume_and_tamper_detection(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    expected = replay_expected(tmp_path)
    asyncio.run(_audit(kafka_bootstrap, database_url, topic_prefix, expected))


# -- roles ---------------------------------------------------------------------------------

# Who may call each /v1 REST operation (admin may call all). An operation the app serves but
# this table lacks fails the test: access to a new endpoint is a decision to write down here.
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/zones/status"): {"dispatcher", "mdt", "auditor"},
    ("GET", "/v1/zones/{zone_id}/status"): {"dispatcher", "mdt", "auditor"},
    ("GET", "/v1/units/{unit_id}/status"): {"dispatcher", "mdt"},  # mdt: its own unit only
    ("GET", "/v1/map/zones"): {"dispatcher", "auditor"},
    ("GET", "/v1/map/units"): {"dispatcher"},
    ("GET", "/v1/history/visits"): {"dispatcher", "auditor"},
    ("GET", "/v1/history/zone-periods"): {"dispatcher", "auditor"},
    ("GET", "/v1/audit/events"): {"auditor"},
    ("GET", "/v1/audit/verify"): {"auditor"},
    ("GET", "/v1/zones"): {"dispatcher", "mdt", "auditor"},
    ("GET", "/v1/zones/{zone_id}"): {"dispatcher", "mdt", "auditor"},
    ("GET", "/v1/zones/{zone_id}/versions"): {"dispatcher", "mdt", "auditor"},
    ("POST", "/v1/zones"): set(),
    ("POST", "/v1/zones/import"): set(),
    ("PUT", "/v1/zones/{zone_id}"): set(),
    ("DELETE", "/v1/zones/{zone_id}"): set(),
}
SAMPLE_PATH_VALUES = {"zone_id": "Z000", "unit_id": MDT_UNIT}
# Writes aim at what does not exist and carry no body: the matrix must not change anything.
WRITE_PATH_VALUES = {"zone_id": "no-such-zone", "unit_id": "no-such-unit"}
ROLES = ("dispatcher", "mdt", "auditor", "admin")


def operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete"}
    return sorted((m.upper(), path) for path, item in doc["paths"].items()
                  if path.startswith("/v1/") for m in item if m in methods)  # fmt: skip


def concrete(method: str, path: str) -> str:
    values = SAMPLE_PATH_VALUES if method == "GET" else WRITE_PATH_VALUES
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no sample value for a parameter of {path}: add it"
    return path


async def _roles(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    # A generous poll budget: the matrix must see 403s, not 429s.
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix, poll_burst=10_000) as st,
        httpx.AsyncClient(base_url=st.base, timeout=30) as http,
    ):
        assert st.api.ctx is not None
        ops = operations(create_app(st.api.ctx).openapi())
        assert ("GET", "/v1/audit/verify") in ops and ("GET", "/v1/history/visits") in ops

        got: dict[tuple[str, str, str], int] = {}
        want: dict[tuple[str, str, str], str] = {}
        for method, path in ops:
            url = concrete(method, path)
            for who, headers in [("nobody", {}),
                                 ("bad key", {"Authorization": "Bearer dw_nope_nope"}),
                                 ("bad key header", {"X-API-Key": "dw_x_y"})]:  # fmt: skip
                got[(method, path, who)] = (await http.request(method, url, headers=headers)
                                            ).status_code  # fmt: skip
                want[(method, path, who)] = "401"
            allowed = ALLOWED.get((method, path))
            if allowed is None:
                continue
            for role in ROLES:
                r = await http.request(method, url, headers=st.headers(role))
                got[(method, path, role)] = r.status_code
                # Allowed: past authorisation (a 404 for the sample values is fine).
                want[(method, path, role)] = (
                    "allowed" if role == "admin" or role in allowed else "403"
                )

        def ok(status: int, expectation: str) -> bool:
            if expectation == "allowed":
                return status not in (401, 403) and status < 500
            return status == int(expectation)

        wrong = {k: (got[k], w) for k, w in want.items() if not ok(got[k], w)}
        assert not wrong, f"(method, path, caller) -> (status, expected): {wrong}"
        missing = [op for op in ops if op not in ALLOWED]
        assert not missing, f"operations with no row in ALLOWED: {missing}"

        # An MDT key is for its own unit only.
        r = await http.get("/v1/units/someone-else/status", headers=st.headers("mdt"))
        assert r.status_code == 403


def test_role_matrix_over_every_rest_operation(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_roles(kafka_bootstrap, database_url, topic_prefix))
