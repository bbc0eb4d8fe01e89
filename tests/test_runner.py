"""run_service: a service runs with the collector tuned for batches, and a crash in run()
stops the service and reaches the caller."""

from __future__ import annotations

import asyncio
import gc
import weakref

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


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


class Starting(Probe):
    """Leaves a cycle of garbage and a structure it keeps, as a service's start does."""

    async def start(self) -> None:
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # garbage once start returns, freed only by a collection
        self.garbage = weakref.ref(a)
        self.kept = [[i] for i in range(100)]

    async def run(self) -> None:
        self.collected = self.garbage() is None
        # Frozen: out of the collector's reach, so no full collection walks it again.
        tracked = gc.get_objects()
        self.frozen = not any(o is self.kept for o in tracked)


def test_what_start_keeps_is_frozen_and_its_garbage_collected() -> None:
    before = gc.get_threshold()
    gc.disable()  # no collection but run_service's own between start and run
    try:
        probe = Starting()
        asyncio.run(run_service(probe))
        assert probe.collected and probe.frozen
    finally:
        gc.unfreeze()
        gc.enable()
        gc.set_threshold(*before)
