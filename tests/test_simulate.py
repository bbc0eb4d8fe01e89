"""The patrol simulator: seeded and repeatable, plausible movement, the stop mix the rules must
judge, noise at the configured rates, and pings that reach the broker keyed by unit."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import defaultdict
from functools import cache
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from dosewatch.cli import main
from dosewatch.demo import make_zones
from dosewatch.replay import run_replay
from dosewatch.settings import ReplaySettings
from dosewatch.simulate import (
    BAD_FIXES,
    REFUSED,
    SimConfig,
    SimFix,
    SimStats,
    import_city,
    simulate,
    simulate_fixes,
    stream,
)
from schemas.ping import Ping, validate_ping
from schemas.timefmt import parse_ts
from services.common.settings import CommonSettings
from services.ingest.service import IngestService, IngestSettings

START = 1_778_781_600_000  # 2026-05-14T18:00:00Z
HOURS = 4
UNITS = 20
INTERVAL_S = 10.0
# Noisier than the defaults, so a few hours hold enough of each kind to count.
NOISY = SimConfig(bad_fix_p=0.01, dropout_per_hour=2.0)


@cache
def zones() -> list[dict[str, object]]:
    return make_zones(7, 30)


@cache
def patrol() -> tuple[SimFix, ...]:
    end = START + HOURS * 3_600_000
    return tuple(
        simulate_fixes(7, zones(), UNITS, START, interval_s=INTERVAL_S, end_ms=end, config=NOISY)
    )


def by_unit(fixes: tuple[SimFix, ...]) -> dict[str, list[SimFix]]:
    out: dict[str, list[SimFix]] = defaultdict(list)
    for f in fixes:
        out[f.ping["unit_id"]].append(f)
    return out


def metres(a: dict[str, float], b: dict[str, float]) -> float:
    k = 111_132.0
    dx = (a["lon"] - b["lon"]) * k * math.cos(math.radians((a["lat"] + b["lat"]) / 2))
    return math.hypot(dx, (a["lat"] - b["lat"]) * k)


async def drain(bootstrap: str, topic: str, want: int) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=5
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(20):
            while len(records) < want:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


def untimed(ping: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in ping.items() if k != "ts"}


def test_same_seed_same_pings_and_another_seed_others() -> None:
    def run(seed: int, units: int = 5) -> list[dict[str, object]]:
        end = START + 1_800_000
        return list(simulate(seed, zones(), units, START, interval_s=5.0, end_ms=end))

    first = run(7)
    assert len(first) > 1000
    assert first == run(7)
    assert first != run(8)
    # Each unit has its own streams: more units leave the first ones' tracks as they were.
    assert [p for p in run(7, 8) if p["unit_id"] in {p["unit_id"] for p in first}] == first


def test_pings_in_time_order_and_valid_except_the_refused_faults() -> None:
    fixes = patrol()
    assert [f.ts_ms for f in fixes] == sorted(f.ts_ms for f in fixes)
    assert all(parse_ts(f.ping["ts"]) == f.ts_ms for f in fixes)
    for f in fixes:
        valid = isinstance(validate_ping(f.ping), Ping)
        assert valid == (f.fault not in REFUSED), f
    optional = {k for f in fixes for k in f.ping} - {"unit_id", "ts", "lat", "lon"}
    assert optional == {"speed_mps", "heading_deg", "accuracy_m"}


def test_units_move_at_street_speeds_without_teleporting() -> None:
    moving = 0
    for fixes in by_unit(patrol()).values():
        good = [f.ping for f in fixes if f.fault is None]
        for a, b in itertools.pairwise(good):
            dt = (parse_ts(b["ts"]) - parse_ts(a["ts"])) / 1000
            # Either fix may be off by its stated accuracy (multipath spikes say so).
            slack = a["accuracy_m"] + b["accuracy_m"]
            assert max(0.0, metres(a, b) - slack) / dt < 40.0, (a, b)
            if a["accuracy_m"] <= 15 and b["accuracy_m"] <= 15:
                assert metres(a, b) / dt < 40.0, (a, b)
                moving += metres(a, b) / dt > 7.0
    assert moving > 1000


def test_jumps_land_kilometres_from_the_track() -> None:
    jumps = 0
    for fixes in by_unit(patrol()).values():
        last = None
        for f in fixes:
            if f.fault in ("far_jump", "null_island") and last is not None:
                jumps += 1
                assert metres(f.ping, last) > 4000
            elif f.fault is None:
                last = f.ping
    assert jumps > 10


def test_stops_span_pass_throughs_target_and_overstays(tmp_path: Path) -> None:
    """Judged by the rules themselves: the replay of a few hours of patrols."""
    zones_path, pings_path = tmp_path / "zones.json", tmp_path / "pings.jsonl"
    zones_path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": zones()}))
    pings_path.write_bytes(b"".join(orjson.dumps(f.ping) + b"\n" for f in patrol()))
    run_replay(zones_path, pings_path, tmp_path / "out", ReplaySettings())
    visits = [orjson.loads(line) for line in (tmp_path / "out/visits.jsonl").read_bytes().split()]
    durations = [v["duration_s"] for v in visits]
    assert sum(d < 120 for d in durations) >= 20
    assert sum(600 <= d <= 1200 for d in durations) >= 20
    assert sum(d > 1200 for d in durations) >= 10  # beyond the default max visit
    assert sum(v["overstay"] for v in visits) >= 10


def test_dropouts_bad_fixes_and_resends_at_the_configured_rates() -> None:
    fixes = patrol()
    reports = sum(f.fault != "duplicate" for f in fixes)
    bad = sum(f.fault in BAD_FIXES for f in fixes)
    assert 0.7 * NOISY.bad_fix_p < bad / reports < 1.3 * NOISY.bad_fix_p
    assert {f.fault for f in fixes} >= {*BAD_FIXES, "duplicate"}
    dropouts = 0
    for unit in by_unit(fixes).values():
        times = [f.ts_ms for f in unit if f.fault != "duplicate"]
        for a, b in itertools.pairwise(times):
            gap_s = (b - a) / 1000
            # A gap is either the report interval (with its jitter) or a minute or more.
            assert gap_s <= 1.06 * INTERVAL_S or gap_s >= 60.0
            dropouts += gap_s >= 60.0
    expected = NOISY.dropout_per_hour * UNITS * HOURS
    assert 0.7 * expected < dropouts < 1.3 * expected


def test_stream_sends_keyed_pings_to_the_raw_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = CommonSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    features = make_zones(3, 10)
    noisy = SimConfig(bad_fix_p=0.05)

    async def scenario() -> tuple[int, list[tuple[bytes, bytes]]]:
        stats = await stream(settings, features, seed=3, units=8, interval_s=0.1, speed=60.0,
                             duration_s=2.0, config=noisy)  # fmt: skip
        records = await drain(kafka_bootstrap, settings.topic_raw, stats.sent)
        return sum(stats.faults[f] for f in REFUSED), [(r.key, r.value) for r in records]

    refused, records = asyncio.run(scenario())
    got: dict[str, list[dict[str, object]]] = defaultdict(list)
    invalid = 0
    for key, value in records:
        ping = orjson.loads(value)
        assert key == ping["unit_id"].encode()
        got[ping["unit_id"]].append(ping)
        invalid += not isinstance(validate_ping(ping), Ping)
    assert refused > 0 and invalid == refused
    # The generator's pings, in each unit's order; only the wall-time stamps differ.
    expected: dict[str, list[dict[str, object]]] = defaultdict(list)
    for p in simulate(3, features, 8, 0, interval_s=6.0, end_ms=120_000, config=noisy):
        expected[p["unit_id"]].append(p)
    assert {u: [untimed(p) for p in ps] for u, ps in got.items()} == {
        u: [untimed(p) for p in ps] for u, ps in expected.items()
    }
    for pings in got.values():
        stamps = [parse_ts(p["ts"]) for p in pings]
        assert stamps == sorted(stamps)


def test_stream_posts_to_the_http_intake(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = IngestSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)

    async def scenario() -> tuple[SimStats, int]:
        service = IngestService(settings)
        await service.start()
        try:
            stats = await stream(settings, make_zones(3, 10), seed=4, units=5, interval_s=0.1,
                                 speed=30.0, duration_s=1.5, config=SimConfig(bad_fix_p=0.15),
                                 http_url=f"http://127.0.0.1:{service.http.port}")  # fmt: skip
        finally:
            await service.stop()
        want = stats.sent - stats.rejected
        return stats, len(await drain(kafka_bootstrap, settings.topic_pings, want))

    stats, accepted = asyncio.run(scenario())
    # Ingest refused exactly the out-of-range and null-island fixes, and passed the rest on.
    assert stats.faults["out_of_range"] > 0 and stats.faults["null_island"] > 0
    assert stats.rejected == sum(stats.faults[f] for f in REFUSED)
    assert accepted == stats.sent - stats.rejected


def test_cli_imports_the_city_and_streams(
    kafka_bootstrap: str,
    topic_prefix: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOSEWATCH_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("DOSEWATCH_TOPIC_PREFIX", topic_prefix)
    monkeypatch.setenv("DOSEWATCH_DATABASE_URL", database_url)
    argv = ["simulate", "--units", "4", "--zones", "12", "--seed", "5", "--rate", "40",
            "--speed", "20", "--duration", "1", "--import-zones"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 zones" in out
    assert "sent " in out and "bad fixes injected" in out

    async def stored() -> int:
        # Importing the same city again (a second run) succeeds and adds no zones.
        await import_city(CommonSettings(database_url=database_url), make_zones(5, 12))
        conn = await asyncpg.connect(database_url)
        try:
            count: int = await conn.fetchval("SELECT count(*) FROM zones")
        finally:
            await conn.close()
        return count

    assert asyncio.run(stored()) == 12
