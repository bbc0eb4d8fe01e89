"""Run a service until SIGINT/SIGTERM, then stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


async def run_service(service: Service) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    work = asyncio.create_task(service.run())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    waiter.cancel()
    await service.stop()
    if work in done and work.exception() is not None:
        raise work.exception()  # type: ignore[misc]
