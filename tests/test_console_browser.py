"""The dispatcher console in headless Chromium (Debian's package) against the running stack:
zones render, a zone turns active when a unit enters it, its meter ticks locally, and a
console that loses its websocket reconnects and catches up."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.api_helpers import api_stack, ping

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS = '<img src=x onerror="window.__xss = 1">'
INSIDE = {
    "Z000": (-73.99308646946923, 40.71047563789939),
    "Z001": (-73.9969840671398, 40.721618846921444),
}

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


async def _scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str,
                    shot: Path) -> None:  # fmt: skip
    from playwright.async_api import async_playwright

    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # A zone name carrying markup must show as text, never run.
            async with httpx.AsyncClient(base_url=st.base, headers=st.headers("admin")) as http:
                z1 = (await http.get("/v1/zones/Z001")).json()["feature"]
                z1["properties"]["name"] = XSS
                assert (await http.put("/v1/zones/Z001", json=z1)).status_code == 200
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{st.base}/#key={st.tokens['dispatcher']}")
            await page.wait_for_function("window.dosewatch.renderedZones() === 12")
            await page.wait_for_selector('#conn[data-state="open"]')
            await page.wait_for_function("window.dosewatch.zoneStatus('Z000') === 'due'")
            assert "key=" not in page.url  # the key leaves the address bar

            await st.send_pings([ping("car-7", *INSIDE["Z000"])])
            await page.wait_for_function("window.dosewatch.zoneStatus('Z000') === 'active'")
            await page.click('#zone-list button[data-zone-id="Z000"]')
            await page.wait_for_selector("#detail:not([hidden])")
            assert "car-7" in await page.inner_text("#detail-units")
            first = await page.inner_text("#meter-elapsed")
            # The meter ticks in the page between status updates (none arrive meanwhile).
            await page.wait_for_function(
                f"document.getElementById('meter-elapsed').textContent !== {first!r}",
                timeout=10_000,
            )
            await page.wait_for_function("window.dosewatch.units() >= 1", timeout=10_000)
            await page.screenshot(path=str(shot))

            # Lose the websocket; a change made meanwhile arrives after the reconnect.
            await page.evaluate("window.dosewatch.dropConnection()")
            await page.wait_for_selector('#conn[data-state="reconnecting"]')
            await st.send_pings([ping("car-8", *INSIDE["Z001"])])
            await page.wait_for_selector('#conn[data-state="open"]', timeout=20_000)
            await page.wait_for_function("window.dosewatch.zoneStatus('Z001') === 'active'")
            assert await page.evaluate("window.dosewatch.zoneStatus('Z000')") == "active"
            assert XSS in await page.inner_text("#feed")  # shown as text...
            await page.evaluate("window.dosewatch.showTooltip('Z001')")  # as on hover
            await page.wait_for_selector(".leaflet-tooltip")
            assert XSS in await page.inner_text(".leaflet-tooltip")
            assert await page.evaluate("window.__xss") is None  # ...and never run

            # A zone created while the console is open is drawn; a deleted one goes.
            async with httpx.AsyncClient(base_url=st.base, headers=st.headers("admin")) as http:
                new = (await http.get("/v1/zones/Z002")).json()["feature"]
                new["id"] = "Z900"
                new["geometry"]["coordinates"] = [
                    [[x + 0.05, y] for x, y, *_ in ring] for ring in new["geometry"]["coordinates"]
                ]
                assert (await http.post("/v1/zones", json=new)).status_code == 201
                await page.wait_for_function("window.dosewatch.renderedZones() === 13")
                assert (await http.delete("/v1/zones/Z900")).status_code in (200, 204)
                await page.wait_for_function("window.dosewatch.renderedZones() === 12")
            assert not errors, errors
        finally:
            await browser.close()


def test_console_in_chromium(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    shot = Path(os.environ.get("DOSEWATCH_SCREENSHOT", tmp_path / "console.png"))
    asyncio.run(_scenario(kafka_bootstrap, database_url, topic_prefix, shot))
    assert shot.stat().st_size > 10_000
