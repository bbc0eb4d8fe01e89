"""run_service: a service runs with the collector tuned for batches, and a crash in run()
stops the service and reaches the caller."""

from __future__ import annotations

import asyncio
import gc

import pytest

from services.common.runner import GC_THRESHOLDS, run_service


class Probe:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: tuple[int, int, int] | None = None
        self.stopped = False

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        self.seen = gc.get_threshold()
        if self.fail:
            raise RuntimeError("broken")

    async def stop(self) -> None:
        self.stopped = True


def test_run_service_tunes_the_collector_and_reports_a_crash() -> None:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's defaults, whatever ran in this process before
    try:
        probe = Probe(fail=True)
        with pytest.raises(RuntimeError, match="broken"):
            asyncio.run(run_service(probe))
        assert probe.seen == GC_THRESHOLDS != (700, 10, 10)
        assert probe.stopped
    finally:
        gc.set_threshold(*before)
