"""Run a service until SIGINT/SIGTERM, then stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)
# A batch allocates thousands of short-lived objects; at CPython's default thresholds
# (700, 10, 10) a collection ran every 700 of them, and a full one walked every zone and unit
# held. Less often: 35-45% more pings per core through the geofence service.
GC_THRESHOLDS = (20_000, 20, 20)


def settle_gc() -> None:
    """Once a service has started: collect what starting left behind, then freeze the rest
    (modules, compiled code, zones, clients), which lives as long as the process, out of the
    collector's reach, and collect less often (`GC_THRESHOLDS`).

    A full collection walks every object the collector tracks: at 10,000 pings/s it stood
    each service still for 64-137 ms, the pipeline's latency tail. Frozen objects are still
    freed by reference counting; only a cycle among them would stay."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cancelling() -> bool:
    """Whether the running task has been asked to cancel. A CancelledError raised while it
    has not came from inside a library, not to this task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Service(Protocol):
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


class Runner:
    """A service's run task, which a move to another broker stops between two batches and
    starts again (`services.common.moving`). A task that ends on its own, or a move that
    fails, is reported to `on_end` with its error (None: run() returned)."""

    def __init__(
        self, service: Service, name: str, on_end: Callable[[str, BaseException | None], None]
    ) -> None:
        self.service = service
        self.name = name
        self._on_end = on_end
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.service.run(), name=self.name)
        self.task.add_done_callback(self._ended)

    async def halt(self) -> None:
        """Cancel the run task and wait for it (its batch in flight is shielded, and waited
        for by the service's `quiet` or `stop`)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # a crash before this was reported when it happened

    def fail(self, exc: BaseException) -> None:
        self._on_end(self.name, exc)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._on_end(self.name, task.exception())


async def run_service(service: Service, control: Callable[[Runner], None] | None = None) -> None:
    """Start the service, run it until SIGINT/SIGTERM or until run() ends, then stop it.
    `control`, given the runner before the service starts, may add what drives it (a stage's
    move to another broker, `services.common.moving`)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ended: asyncio.Future[BaseException | None] = loop.create_future()

    def on_end(_name: str, exc: BaseException | None) -> None:
        if not ended.done():
            ended.set_result(exc)

    runner = Runner(service, getattr(service, "name", "service"), on_end)
    if control is not None:
        control(runner)
    await service.start()
    settle_gc()  # for the rest of the process
    runner.start()
    waiter = asyncio.create_task(stop.wait())
    either: set[asyncio.Future[Any]] = {ended, waiter}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    # A run() that crashed is reported below, after stop(): its clients still get closed
    # (the group learns at once that this member left, not after a session timeout).
    await runner.halt()
    waiter.cancel()
    await service.stop()
    if ended.done() and ended.result() is not None:
        raise ended.result()  # type: ignore[misc]
