"""Stages running as processes of their own, moved to a new embedded broker through their
control routes (`rollover.RemoteStage`, DOSEWATCH_CONTROL_TOKEN), while pings keep coming:
what comes out is what one broker would have made. The routes answer only the token's bearers,
and a stage started without a token has none."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from dosewatch import rollover
from services.common import kafka
from services.common.embedded import EmbeddedKafka, free_port
from services.common.settings import CommonSettings
from tests.pipeline_helpers import (
    TZ,
    Proc,
    db_periods,
    db_visits,
    keyed,
    prepare_database,
    refused,
    replay_expected,
    wait_for,
)

SERVICES = ("ingest", "geofence", "dosage")
TOKEN = "test-control-token"


def test_stage_processes_move_to_new_brokers_and_give_what_one_broker_gives(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The evening shift: a third before the first rollover, a third across it (sent while it
    happens) and before the second, the rest after. Visits and zone periods are exactly
    replay's, each service is still the process it was, and the old brokers are gone."""
    expected = replay_expected(tmp_path)
    third = len(expected.lines) // 3
    asyncio.run(prepare_database(database_url))

    async def scenario() -> dict[str, Any]:
        broker = EmbeddedKafka(free_port())
        await broker.start()
        env = dict(os.environ) | {
            "DOSEWATCH_KAFKA_BOOTSTRAP": broker.bootstrap,
            "DOSEWATCH_DATABASE_URL": database_url,
            "DOSEWATCH_TOPIC_PREFIX": topic_prefix,
            "DOSEWATCH_TZ": TZ["tz"],
            "DOSEWATCH_SHIFTS": TZ["shifts"],
            "DOSEWATCH_WALL_CLOCK": "false",  # clocks follow the data alone: runs are comparable
            "DOSEWATCH_LOG_LEVEL": "WARNING",
            "DOSEWATCH_CONTROL_TOKEN": TOKEN,
        }
        procs = {name: Proc(name, env, tmp_path / f"{name}.log") for name in SERVICES}
        # Started without a token: no control routes at all.
        plain_env = {k: v for k, v in env.items() if k != "DOSEWATCH_CONTROL_TOKEN"}
        plain_env["DOSEWATCH_TOPIC_PREFIX"] = topic_prefix + "plain."
        plain = Proc("ingest", plain_env, tmp_path / "plain.log")
        for p in [*procs.values(), plain]:
            p.start()
        settings = CommonSettings(topic_prefix=topic_prefix)
        feed = rollover.SwitchedProducer(broker.bootstrap, settings.topic_raw)
        handles = [
            rollover.RemoteStage(n, f"http://127.0.0.1:{procs[n].port}", TOKEN, timeout_s=30)
            for n in SERVICES
        ]
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        out: dict[str, Any] = {"brokers": [broker.bootstrap]}
        try:
            for p in [*procs.values(), plain]:
                await asyncio.to_thread(p.wait_ready)
            out["answers"] = await _answers(procs["geofence"].port, plain.port)
            out["other_count"] = await _prepare_elsewhere(procs["geofence"].port, topic_prefix)
            pids = {n: p.proc.pid for n, p in procs.items() if p.proc is not None}
            await feed.start()
            lines = keyed(expected.lines)
            await feed.send(lines[:third])
            await wait_for(pool, "SELECT count(*) FROM visits", 1)  # state to carry over
            middle = lines[third : 2 * third]
            chunks = [middle[i : i + 200] for i in range(0, len(middle), 200)]

            async def during() -> None:
                """Sends on while the stages prepare, and some once the feed has switched."""
                for i, chunk in enumerate(chunks):
                    if i == len(chunks) // 2:
                        while not feed.sends_at_switch:
                            await asyncio.sleep(0.01)
                    await feed.send(chunk)
                    await asyncio.sleep(0.01)

            sending = asyncio.create_task(during())
            await asyncio.sleep(0.05)
            out["steps"] = [await rollover.roll_over(broker, settings, handles, feed.switch)]
            await sending
            out["sent_before"], out["chunks"] = feed.sends_at_switch[0] - 1, len(chunks)
            out["brokers"].append(broker.bootstrap)
            out["steps"].append(await rollover.roll_over(broker, settings, handles, feed.switch))
            out["brokers"].append(broker.bootstrap)
            await feed.send(lines[2 * third :])
            await wait_for(pool, "SELECT count(*) FROM visits", len(expected.visits))
            await wait_for(pool, "SELECT count(*) FROM zone_periods", len(expected.periods))
            await asyncio.sleep(1.0)  # anything extra would show up
            out["visits"] = db_visits(list(await pool.fetch("SELECT * FROM visits")))
            out["periods"] = db_periods(list(await pool.fetch("SELECT * FROM zone_periods")))
            out["same_pids"] = {n: p.proc.pid for n, p in procs.items() if p.proc} == pids
            out["alive"] = [n for n, p in procs.items() if p.proc and p.proc.poll() is None]
            out["old_gone"] = [await refused(b) for b in out["brokers"][:-1]]
        finally:
            await pool.close()
            await feed.stop()
            for h in handles:
                await h.aclose()
            for p in [*procs.values(), plain]:
                await asyncio.to_thread(p.stop)
            await broker.stop()
        out["logs"] = {n: p.log.read_text() for n, p in procs.items()}
        return out

    out = asyncio.run(scenario())
    print(f"rollover steps: {out['steps']}")
    assert out["answers"] == {
        "no token": 401,
        "wrong token": 401,
        "move before prepare": 409,
        "both conditions": 422,
        "started without a token": 404,
    }
    status, detail = out["other_count"]
    assert status == 502 and "partitions" in detail and "geofence keeps its state" in detail
    assert len(set(out["brokers"])) == 3
    assert all(
        set(s) == {"broker_s", "prepare_s", "ingest_s", "geofence_s", "dosage_s"}
        for s in out["steps"]
    )
    assert 0 < out["sent_before"] < out["chunks"], "records were sent across the rollover, too"
    assert out["visits"] == expected.visits
    assert out["periods"] == expected.periods
    assert out["same_pids"] and out["alive"] == list(SERVICES)
    assert out["old_gone"] == [True, True]
    for name, text in out["logs"].items():
        assert "Traceback" not in text, f"{name}: {text[-3000:]}"
        # Old clients are closed before their broker goes (`/control/release`).
        assert '"level":"error"' not in text, f"{name}: {text[-3000:]}"


async def _answers(port: int, plain_port: int) -> dict[str, int]:
    """What the control routes answer to callers that should not get their way."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        asked = {
            "no token": await client.post("/control/cancel"),
            "wrong token": await client.post(
                "/control/cancel", headers={"Authorization": "Bearer nope"}
            ),
            "move before prepare": await client.post(
                "/control/move", json={"ends": {}}, headers=bearer
            ),
            "both conditions": await client.post(
                "/control/move", json={"ends": {}, "since_ms": 0}, headers=bearer
            ),
            "started without a token": await client.post(
                f"http://127.0.0.1:{plain_port}/control/cancel", headers=bearer
            ),
        }
    return {what: r.status_code for what, r in asked.items()}


async def _prepare_elsewhere(port: int, topic_prefix: str) -> tuple[int, str]:
    """A prepare towards a broker whose pings topic has another partition count (2, not 4)."""
    other = EmbeddedKafka(free_port())
    await other.start()
    try:
        there = CommonSettings(kafka_bootstrap=other.bootstrap, topic_prefix=topic_prefix,
                               partitions=2)  # fmt: skip
        await kafka.ensure_topics(there, {there.topic_pings: {}})
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{port}/control/prepare",
                                  json={"bootstrap": other.bootstrap},
                                  headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        return r.status_code, r.json()["detail"]
    finally:
        await other.stop()


def test_a_short_control_token_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """Whoever holds the token can point a stage at any broker: an empty or short one is a
    mistake to say at start, not a door left open ("Bearer " alone would match an empty one)."""
    for short in ("", "not-long-enough"):
        with pytest.raises(ValidationError, match="at least 16 characters"):
            CommonSettings(control_token=short)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    from_file = CommonSettings(control_token_file=token_file).control_token
    assert from_file is not None and from_file.get_secret_value() == TOKEN
