"""The stages of `dosewatch up` as one unit: started in order, stopped in reverse, and rolled
over to a fresh embedded broker when its topics grow (`rollover`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg

from dosewatch import rollover
from services.api.service import ApiService
from services.api.settings import ApiSettings
from services.common import kafka
from services.common.embedded import EmbeddedKafka, EmbeddedProxy
from services.common.metrics import BROKER_ROLLOVERS
from services.common.runner import cancelling, settle_gc
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings

log = logging.getLogger("dosewatch.stack")

STAGES = ("ingest", "geofence", "dosage")
DRAIN_TIMEOUT_S = 60.0


class _ExpectedLoss(logging.Filter):
    """Kafka clients that outlive a broker swap (the demo feed's producer) log losing it as
    an error; during the swap that is expected, so it is logged as info."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def stop_step(step: Awaitable[object]) -> None:
    """One step of stopping, which must not keep the next from running: its errors are
    logged. A CancelledError from inside it is its own too (as `kafka.stop_client` treats
    aiokafka's), unless this task is itself being cancelled."""
    try:
        await step
    except asyncio.CancelledError:
        if cancelling():
            raise
        log.warning("a step of stopping was cut short")
    except Exception as exc:
        log.warning("a step of stopping failed", extra={"error": repr(exc)})


async def _together(*steps: Awaitable[None]) -> None:
    """Run steps at once and wait for every one, even when one fails (a stage still starting
    as the stack stops would be left running); then raise the first failure."""
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


class RolloverAbandoned(RuntimeError):
    """A stage did not catch up in time; the stack resumed on the broker it had."""


class Stack:
    def __init__(
        self,
        ingest: IngestSettings,
        geofence: GeofenceSettings,
        dosage: DosageSettings,
        api: ApiSettings,
        broker: EmbeddedKafka | None = None,
        proxy: EmbeddedProxy | None = None,
    ) -> None:
        self._settings: dict[str, Any] = {"ingest": ingest, "geofence": geofence,
                                          "dosage": dosage}  # fmt: skip
        self.api = ApiService(api)
        self.broker = broker
        self.proxy = proxy  # in front of the broker, for clients outside the process
        self.stages: dict[str, Any] = {}
        self._ports: dict[str, int] = {}  # a stage started again keeps its HTTP address
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._supervised: list[asyncio.Task[Any]] = []
        self._rolling: asyncio.Task[tuple[float, int]] | None = None
        # Set to the error of the first task to end on its own (they run until stopped).
        self.failed: asyncio.Future[BaseException] | None = None
        # Producers in this process (the demo feed) send under it; a rollover holds it.
        self.gate = asyncio.Lock()

    @property
    def ingest_settings(self) -> IngestSettings:
        """Topic names and the broker's address, which every stage shares."""
        settings: IngestSettings = self._settings["ingest"]
        return settings

    @property
    def services(self) -> list[Any]:
        # In pipeline order, whichever stage finished starting first.
        return [*(self.stages[n] for n in STAGES if n in self.stages), self.api]

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        # Together: each opens its clients and loads its state (and, in a consumer group,
        # waits about 2 s for it to form). Each stage makes the topics it reads before it
        # consumes, so none waits on another.
        await _together(*(self._start(name) for name in STAGES))
        await self.api.start()
        self._run("api", self.api)

    async def stop(self) -> None:
        for task in self._supervised:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._rolling is not None and not self._rolling.done():
            # Cut short, a rollover would leave stages half started on a broker half replaced.
            await stop_step(self._rolling)
        for name in list(self._tasks):
            await self._cancel(name)
        await stop_step(self.api.stop())
        for name in reversed(STAGES):
            await stop_step(self._halt(name))

    def supervise(self, task: asyncio.Task[Any]) -> None:
        """A task of the stack's (the demo feed, the broker watch): its failure is the stack's,
        and it is cancelled with the stack."""
        task.add_done_callback(self._ended)
        self._supervised.append(task)

    # -- the rollover -----------------------------------------------------------------------

    async def watch_broker(self, limit: int, every_s: float) -> None:
        """Roll over once any partition holds `limit` records (a bound on its batches)."""
        s = self.ingest_settings
        topics = [s.topic_raw, s.topic_pings, s.topic_dlq, s.topic_visits, s.topic_status,
                  s.topic_audit]  # fmt: skip
        while True:
            await asyncio.sleep(every_s)
            try:
                ends = await rollover.end_offsets(s, topics)
            except Exception as exc:  # aiokafka's errors share no useful base; asked again
                log.warning("broker size unknown", extra={"error": repr(exc)})
                continue
            tp, records = rollover.largest(ends)
            if tp is None or records < limit:
                continue
            where = {"topic": tp.topic, "partition": tp.partition, "records": records}
            log.info("rolling the embedded broker over", extra=where)
            # Shielded: a stop that comes meanwhile waits for it to finish (see `stop`).
            self._rolling = asyncio.create_task(self.roll_over())
            try:
                paused_s, tail = await asyncio.shield(self._rolling)
            except RolloverAbandoned as exc:
                BROKER_ROLLOVERS.labels("abandoned").inc()
                log.error("broker rollover abandoned", extra={"reason": str(exc)})
                continue
            BROKER_ROLLOVERS.labels("done").inc()
            log.info("embedded broker rolled over",
                     extra={"paused_s": round(paused_s, 3), "tail_records": tail})  # fmt: skip

    async def roll_over(self) -> tuple[float, int]:
        """Drain the stages, start a new broker, resume them on it with their state.

        Clients outside the process are shut out first (the proxy stops; their requests in
        flight fail, and they send them again), then ingest stops, so its input stands still;
        each stage downstream reads to the end and saves, and so does the API's feed. Raw
        records ingest had not committed are carried over, and outside clients come back once
        they are on the new broker. The API keeps serving (and its websockets stay open)
        while its feed lets go of the old broker and reads the new one; dosage publishes every
        zone's status again for the status topic. Should anything not read to the end in
        time, everything resumes on the old broker (`RolloverAbandoned`).
        Returns the seconds input stood still and the raw records carried over."""
        assert self.broker is not None, "only the embedded broker is rolled over"
        started = time.monotonic()
        async with self.gate:
            # The stages about to be replaced were frozen with the process (settle_gc):
            # thawed, the collector can free them.
            gc.unfreeze()
            if self.proxy is not None:
                await self.proxy.stop()
            try:
                tail = await self._quiesce()
            except TimeoutError:
                await self._resume(new_broker=False)
                await self._reopen()
                settle_gc()
                raise RolloverAbandoned(
                    f"a reader did not reach the end in {DRAIN_TIMEOUT_S:.0f} s"
                ) from None
            quiet = time.monotonic()
            await self._swap(tail)
            await self._reopen()
            swapped = time.monotonic()
            await self._resume(new_broker=True)
            settle_gc()
        log.info("broker rollover steps", extra={
            "drain_s": round(quiet - started, 3), "swap_s": round(swapped - quiet, 3),
            "start_s": round(time.monotonic() - swapped, 3)})  # fmt: skip
        return time.monotonic() - started, len(tail)

    async def _quiesce(self) -> list[rollover.TailRecord]:
        """Stop everything in the process that reads or writes the broker, each once it has
        read to the end; return the raw records ingest left."""
        await self._halt("ingest")
        # A stage's input is whole once the stage before it has saved and its outputs are
        # acked; the rest of its stop (HTTP server, clients) goes on meanwhile.
        closing: list[asyncio.Task[None]] = []
        try:
            for name in ("geofence", "dosage"):
                await self._drain(self.stages[name])
                await self._cancel(name)
                await self.stages[name].quiet()
                closing.append(asyncio.create_task(self._halt(name)))
            # The API's view too: pings and statuses it has not read would be lost to it.
            assert self.api.feed is not None
            await self._drain(self.api.feed)
            await self._cancel("api")
            await self.api.feed.disconnect()
            s = self.ingest_settings
            return await rollover.read_tail(s, s.group_id, s.topic_raw, DRAIN_TIMEOUT_S)
        finally:
            await _together(*closing)

    async def _swap(self, tail: list[rollover.TailRecord]) -> None:
        """A new broker, saved offsets at its start, and the raw tail on it."""
        assert self.broker is not None
        expected = _ExpectedLoss()
        logging.getLogger("aiokafka").addFilter(expected)
        try:
            await self.broker.restart()
        finally:
            logging.getLogger("aiokafka").removeFilter(expected)
        s = self.ingest_settings
        conn = await asyncpg.connect(s.database_url.get_secret_value())
        try:
            await rollover.restart_offsets(conn)
        finally:
            await conn.close()
        await kafka.ensure_topics(s, {s.topic_raw: {}})
        await rollover.write_tail(s, s.topic_raw, tail)

    async def _resume(self, new_broker: bool) -> None:
        """Start what `_quiesce` stopped, together (as `start`). On a new broker dosage
        publishes its statuses again, and the API reads the pings topic from its start."""
        assert self.api.feed is not None
        starts = [self._start(name, republish=new_broker and name == "dosage")
                  for name in STAGES if name not in self.stages]  # fmt: skip
        if self.api.feed.consumer is None:
            starts.append(self.api.feed.connect(pings_from_start=new_broker))
        await _together(*starts)
        if "api" not in self._tasks:
            self._run("api", self.api)

    async def _reopen(self) -> None:
        if self.proxy is not None:
            await self.proxy.start()

    async def _drain(self, reader: Any) -> None:
        """Wait until a stage (or the API's feed) has read its input to the end; call it once
        what writes that input has stopped."""
        since_ms = time.time() * 1000
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while not await reader.drained(since_ms):
                await asyncio.sleep(0.01)

    # -- stages -----------------------------------------------------------------------------

    async def _start(self, name: str, republish: bool = False) -> None:
        settings = self._settings[name]
        if name in self._ports:
            settings = settings.model_copy(update={"http_port": self._ports[name]})
        stage: Any
        if name == "ingest":
            stage = IngestService(settings)
        elif name == "geofence":
            stage = GeofenceService(settings)
        else:
            stage = DosageService(settings, republish=republish)
        await stage.start()
        self.stages[name] = stage
        self._ports[name] = stage.http.port
        self._run(name, stage)

    async def _halt(self, name: str) -> None:
        await self._cancel(name)
        stage = self.stages.pop(name, None)
        if stage is not None:
            await stage.stop()

    def _run(self, name: str, service: Any) -> None:
        task = asyncio.create_task(service.run(), name=name)
        task.add_done_callback(self._ended)
        self._tasks[name] = task

    async def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self.failed is None or self.failed.done():
            return
        exc = task.exception()
        self.failed.set_result(exc or RuntimeError(f"{task.get_name()} ended"))
