"""Shared helpers for the streaming integration tests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer

from dosewatch.replay import decode_lines
from schemas.timefmt import datetime_to_ms, format_ts
from services.common import db
from services.common.embedded import free_port
from services.common.kafka import partition_for
from services.common.zonestore import import_zones
from services.dosage.core.tracker import Fix

SAMPLE = Path(__file__).parent / "data" / "evening-shift"


def sample_fixes() -> list[Fix]:
    lines = enumerate((SAMPLE / "pings.jsonl").read_bytes().splitlines(), start=1)
    return [fix for fix, _ in decode_lines(lines) if fix is not None]


def flush_fixes(after_ms: int, partitions: int) -> list[Fix]:
    """One far-away ping per partition, an hour after the input: every partition's clock
    passes max_gap beyond every unit, so every visit closes, live as in replay."""
    out: dict[int, Fix] = {}
    n = 0
    while len(out) < partitions:
        unit = f"flush-{n}"
        p = partition_for(unit.encode(), partitions)
        out.setdefault(p, Fix(unit, after_ms + 3_600_000, -70.0, 40.0))
        n += 1
    return [out[p] for p in sorted(out)]


def ping_bytes(fix: Fix) -> bytes:
    doc: dict[str, Any] = {"unit_id": fix.unit_id, "ts": format_ts(fix.ts), "lat": fix.lat,
                           "lon": fix.lon}  # fmt: skip
    if fix.accuracy_m is not None:
        doc["accuracy_m"] = fix.accuracy_m
    return orjson.dumps(doc)


async def prepare_database(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        written, errors = await import_zones(
            conn, orjson.loads((SAMPLE / "zones.geojson").read_bytes())
        )
        assert not errors and written == 12
    finally:
        await conn.close()


async def collect(bootstrap: str, topic: str, until: Any, timeout_s: float = 60) -> list[Any]:
    """Read `topic` from the start until `until(values)` is true."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)  # fmt: skip
    await consumer.start()
    values: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(values):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    values.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return values


TZ = {"tz": "America/New_York", "shifts": "07:00,15:00,23:00"}


@dataclass(frozen=True)
class Expected:
    """The sample plus flush pings, and what `dosewatch replay` makes of them."""

    pings: Path
    lines: list[bytes]
    visits: list[dict[str, Any]]
    periods: list[dict[str, Any]]
    events: list[dict[str, Any]]


def replay_expected(tmp_path: Path) -> Expected:
    from dosewatch.cli import main as cli

    fixes = sample_fixes()
    lines = (SAMPLE / "pings.jsonl").read_bytes().splitlines()
    lines += [ping_bytes(f) for f in flush_fixes(max(f.ts for f in fixes), 4)]
    pings = tmp_path / "pings.jsonl"
    pings.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "replay"
    args = ["replay", "--zones", str(SAMPLE / "zones.geojson"), "--pings", str(pings),
            "--out", str(out), "--tz", TZ["tz"], "--shifts", TZ["shifts"]]  # fmt: skip
    assert cli(args) == 0

    def rows(name: str) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in (out / name).read_bytes().splitlines()]

    return Expected(pings, lines, rows("visits.jsonl"), rows("zone_periods.jsonl"),
                    rows("events.jsonl"))  # fmt: skip


def keyed(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Raw lines keyed by unit, as an order-preserving gateway sends them."""
    return [(orjson.loads(x)["unit_id"].encode(), x) for x in lines]


def _ts(value: datetime) -> str:
    return format_ts(datetime_to_ms(value))


def db_visits(records: list[Any]) -> list[dict[str, Any]]:
    """`visits` table rows in the form and order of replay's visits.jsonl."""
    rows = [
        {"unit_id": r["unit_id"], "zone_id": r["zone_id"], "started_at": _ts(r["started_at"]),
         "ended_at": _ts(r["ended_at"]), "duration_s": r["duration_s"],
         "end_reason": r["end_reason"], "qualified": r["qualified"],
         "target_met": r["target_met"], "overstay": r["overstay"]}
        for r in records
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (r["started_at"], r["unit_id"], r["zone_id"]))


def db_periods(records: list[Any]) -> list[dict[str, Any]]:
    """`zone_periods` table rows in the form and order of replay's zone_periods.jsonl."""
    rows = [
        {"zone_id": r["zone_id"], "period_start": _ts(r["period_start"]),
         "period_end": _ts(r["period_end"]), "presence_s": r["presence_s"],
         "officer_s": r["officer_s"], "visits": r["visits"], "dosed_visits": r["dosed_visits"]}
        for r in records
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (r["zone_id"], r["period_start"]))


async def send_records(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Keyed records onto `topic`, a batch per partition, acked."""
    from aiokafka import AIOKafkaProducer

    from services.common.kafka import BatchProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        await BatchProducer(producer).send(topic, records)
    finally:
        await producer.stop()


async def send_fixes(bootstrap: str, topic: str, fixes: list[Fix]) -> None:
    """Normalised pings straight onto `topic`, keyed by unit, as ingest would write them."""
    await send_records(bootstrap, topic, [(f.unit_id.encode(), ping_bytes(f)) for f in fixes])


async def wait_for(pool: asyncpg.Pool, sql: str, want: int, timeout_s: float = 90) -> None:
    """Until the count `sql` returns reaches `want`."""
    async with asyncio.timeout(timeout_s):
        while await pool.fetchval(sql) < want:
            await asyncio.sleep(0.2)


class Proc:
    """A service as a process of its own (`dosewatch <name>`), logging to `log`."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = env | {"DOSEWATCH_HTTP_PORT": str(self.port)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dosewatch.cli", self.name],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def refused(bootstrap: str) -> bool:
    """Whether nothing listens at `bootstrap` any more."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        _reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False
