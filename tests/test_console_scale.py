"""The console with 5,000 zones and 500 units, in headless Chromium: everything renders, and
the page keeps up with 200 status changes/s. Timings are printed, not asserted (shared
machines are noisy); run with -s to see them."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dosewatch.demo import make_zones
from schemas.timefmt import format_ts
from services.api import keys
from services.api.app import create_app
from services.api.auth import Authenticator
from services.api.context import ApiContext, Fix
from services.api.core.statusbook import StatusBook
from services.api.live import initial_status, zone_info
from services.api.settings import ApiSettings
from services.common import db
from services.common.http import HttpServer
from tests.test_console_browser import CHROMIUM

ZONES, UNITS, RATE, SECONDS = 5000, 500, 200, 5

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


def status(zone_id: str, kind: str, at_ms: int, units: list[str]) -> dict[str, Any]:
    s = initial_status(zone_info_cache[zone_id], 900.0)
    since = format_ts(at_ms)
    return s | {"status": kind, "as_of": format_ts(at_ms), "units_present": units,
                "occupied_since": since if units else None,
                "units": [{"unit_id": u, "since": since} for u in units]}  # fmt: skip


zone_info_cache: dict[str, Any] = {}


async def _scenario(database_url: str) -> None:
    from playwright.async_api import async_playwright

    features = make_zones(11, ZONES, box_km=30.0)
    settings = ApiSettings(database_url=database_url, api_port=0)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await db.migrate(conn)
        token, _ = await keys.create_key(conn, "dispatcher", None, "scale", "test", "t")
    ctx = ApiContext(settings, pool, Authenticator(settings, pool), StatusBook())
    for f in features:
        info = zone_info(f)
        zone_info_cache[info.zone_id] = info
        ctx.zones[info.zone_id] = info
        ctx.book.apply(initial_status(info, 900.0))
    ids = sorted(ctx.zones)
    for u in range(UNITS):
        w, s, e, n = ctx.zones[ids[u * 7 % ZONES]].bbox
        ctx.fixes[f"car-{u}"] = Fix((s + n) / 2, (w + e) / 2, format_ts(int(time.time() * 1000)),
                                    time.time())  # fmt: skip
    ctx.ready = True
    http = HttpServer(create_app(ctx), "127.0.0.1", 0, ws_per_message_deflate=False)
    await http.start()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.monotonic()
            await page.goto(f"http://127.0.0.1:{http.port}/#key={token}")
            await page.wait_for_function(f"window.dosewatch.renderedZones() === {ZONES}",
                                         timeout=60_000)  # fmt: skip
            await page.wait_for_selector('#conn[data-state="open"]', timeout=60_000)
            await page.wait_for_function(f"window.dosewatch.units() === {UNITS}", timeout=60_000)
            loaded = time.monotonic() - t0

            # 200 changes/s for a few seconds, fed to the book as the Kafka feed would.
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < SECONDS:
                due = int((time.monotonic() - start) * RATE)
                while n < due:
                    zid = ids[n * 37 % ZONES]
                    kind = ("active", "met", "due")[n % 3]
                    ctx.book.apply(status(zid, kind, 1_800_000_000_000 + n, ["car-1"]))
                    n += 1
                ctx.changed.set()
                await asyncio.sleep(0.01)
            final = ctx.book.seq
            t1 = time.monotonic()
            await page.wait_for_function(f"window.dosewatch.seq() >= {final}", timeout=60_000)
            lag = time.monotonic() - t1
            last = ids[(n - 1) * 37 % ZONES]
            shown = await page.evaluate(f"window.dosewatch.zoneStatus({last!r})")
            assert shown == ctx.book.zones[last]["status"]
            # The list and meters keep ticking: the page answers promptly afterwards.
            t2 = time.monotonic()
            await page.evaluate("1 + 1")
            answer = time.monotonic() - t2
            await browser.close()
            assert not errors, errors
            print(f"\nconsole: {ZONES} zones and {UNITS} units ready in {loaded:.1f} s; "
                  f"{n} changes at {RATE}/s, caught up {lag * 1000:.0f} ms after the last; "
                  f"page answered in {answer * 1000:.0f} ms; "
                  f"{math.floor(n / SECONDS)} changes/s applied")  # fmt: skip
    finally:
        await http.stop()
        await pool.close()


def test_console_holds_5000_zones_and_500_units(database_url: str) -> None:
    asyncio.run(_scenario(database_url))
