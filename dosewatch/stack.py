"""The stages of `dosewatch up` as one unit: started in order, stopped in reverse, and rolled
over to a fresh embedded broker when its topics grow (`rollover`). The stages run in this
process, or each in its own (`stageproc`, given the environment they read settings from)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

from dosewatch import rollover
from dosewatch.rollover import RolloverAbandoned
from dosewatch.stageproc import Launch, StageProcess, StageProcessError
from services.api.service import ApiService
from services.api.settings import ApiSettings
from services.common import moving
from services.common.embedded import EmbeddedKafka, EmbeddedProxy
from services.common.metrics import BROKER_ROLLOVERS
from services.common.runner import Runner, cancelling
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings

log = logging.getLogger("dosewatch.stack")

STAGES = ("ingest", "geofence", "dosage")
MOVE_TIMEOUT_S = 60.0  # past it, a stage that has not read its old input is stuck


class _ExpectedLoss(logging.Filter):
    """Kafka clients in this process that go through the proxy (the demo feed's producer) log
    losing it as an error; while a rollover starts it again that is expected, so it is logged
    as info."""

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


class Stack:
    def __init__(
        self,
        ingest: IngestSettings,
        geofence: GeofenceSettings,
        dosage: DosageSettings,
        api: ApiSettings,
        broker: EmbeddedKafka | None = None,
        proxy: EmbeddedProxy | None = None,
        processes: Launch | None = None,
    ) -> None:
        """With `processes`, each stage runs as a process of its own."""
        self._settings: dict[str, Any] = {"ingest": ingest, "geofence": geofence,
                                          "dosage": dosage}  # fmt: skip
        self.api = ApiService(api)
        self.broker = broker
        self.proxy = proxy  # in front of the broker, for clients outside the process
        self.processes = processes
        self.stages: dict[str, Any] = {}
        self._runners: dict[str, Runner] = {}
        self._supervised: list[asyncio.Task[Any]] = []
        self._rolling: asyncio.Task[dict[str, float]] | None = None
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

    def addresses(self) -> dict[str, str]:
        """Each stage's HTTP address and the API's, in pipeline order."""
        return {s.name: f"http://127.0.0.1:{s.port if isinstance(s, StageProcess) else s.http.port}"
                for s in self.services}  # fmt: skip

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        # Together: each opens its clients and loads its state (and, in a consumer group,
        # waits about 2 s for it to form). Each stage makes the topics it reads before it
        # consumes, so none waits on another.
        await rollover.together([self._start(name) for name in STAGES])
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
        for name in list(self._runners):
            await self._cancel(name)
        await stop_step(self.api.stop())
        for name in reversed(STAGES):
            await stop_step(self._halt(name))

    def supervise(self, task: asyncio.Task[Any]) -> None:
        """A task of the stack's (the demo feed, the broker watch): its failure is the stack's,
        and it is cancelled with the stack."""
        task.add_done_callback(self._task_ended)
        self._supervised.append(task)

    # -- the rollover -----------------------------------------------------------------------

    async def watch_broker(self, limit: int, every_s: float) -> None:
        """Roll over once any partition holds `limit` records (a bound on its batches)."""
        while True:
            await asyncio.sleep(every_s)
            s = self.ingest_settings  # on the broker of the moment
            topics = [s.topic_raw, s.topic_pings, s.topic_dlq, s.topic_visits, s.topic_status,
                      s.topic_audit]  # fmt: skip
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
                steps = await asyncio.shield(self._rolling)
            except RolloverAbandoned as exc:
                BROKER_ROLLOVERS.labels("abandoned").inc()
                log.error("broker rollover abandoned", extra={"reason": str(exc)})
                continue
            BROKER_ROLLOVERS.labels("done").inc()
            log.info("embedded broker rolled over", extra=steps)

    async def roll_over(self) -> dict[str, float]:
        """Move every stage to a fresh embedded broker (`rollover.roll_over`), then the API's
        feed. Clients outside the process are switched first: the proxy starts again in front
        of the new broker (their requests in flight fail, and they send them there), so the
        old raw topic is read to the end once fetches answered after that reach its end.

        Should the new broker or a stage's clients on it fail to start, nothing has moved:
        the stack goes on where it was (`RolloverAbandoned`). Returns, in seconds, how long
        the preparing took and when each stage had moved, from the proxy's restart."""
        assert self.broker is not None, "only the embedded broker is rolled over"
        handles: list[rollover.LocalStage] | list[rollover.RemoteStage]
        if self.processes is None:
            handles = [rollover.LocalStage(self.stages[n], self._runners[n], MOVE_TIMEOUT_S)
                       for n in STAGES]  # fmt: skip
        else:
            handles = [rollover.RemoteStage(n, self.stages[n].url, self.processes.control_token,
                                            MOVE_TIMEOUT_S) for n in STAGES]  # fmt: skip
        try:
            steps = await rollover.roll_over(
                self.broker,
                self.ingest_settings,
                handles,
                self._switch_proxy,
                {"api": self._move_api},
            )
        finally:
            for handle in handles:
                if isinstance(handle, rollover.RemoteStage):
                    await handle.aclose()
        for name in STAGES:
            self._settings[name] = self._settings[name].model_copy(
                update={"kafka_bootstrap": self.broker.bootstrap}
            )
        return steps

    async def _switch_proxy(self, bootstrap: str) -> rollover.Condition:
        async with self.gate:
            if self.proxy is not None:
                expected = _ExpectedLoss()
                logging.getLogger("aiokafka").addFilter(expected)
                try:
                    await self.proxy.stop()
                    self.proxy.origin = bootstrap
                    await self.proxy.start()
                finally:
                    logging.getLogger("aiokafka").removeFilter(expected)
        return {"since_ms": time.time() * 1000}  # nothing writes the old raw topic from here on

    async def _move_api(self, bootstrap: str) -> None:
        """The API's feed reads what dosage left on the old broker, then the new topics from
        their start; the API answers and its websockets stay open meanwhile."""
        feed = self.api.feed
        assert feed is not None
        since_ms = time.time() * 1000
        await moving.until(partial(feed.drained, since_ms), "the API's feed", MOVE_TIMEOUT_S)
        await self._cancel("api")
        await feed.disconnect()
        await feed.connect(pings_from_start=True, bootstrap=bootstrap)
        self._run("api", self.api)

    # -- stages -----------------------------------------------------------------------------

    async def _start(self, name: str) -> None:
        if self.processes is not None:
            process = StageProcess(name, self.processes.env)
            await process.start()
            self.stages[name] = process
            self.supervise(asyncio.create_task(self._watch(process), name=name))
            return
        settings = self._settings[name]
        stage: Any
        if name == "ingest":
            stage = IngestService(settings)
        elif name == "geofence":
            stage = GeofenceService(settings)
        else:
            stage = DosageService(settings)
        await stage.start()
        self.stages[name] = stage
        self._run(name, stage)

    async def _halt(self, name: str) -> None:
        await self._cancel(name)
        stage = self.stages.pop(name, None)
        if stage is not None:
            await stage.stop()

    @staticmethod
    async def _watch(process: StageProcess) -> None:
        """A stage process that ends on its own ends the stack (`_ended`): `up` says which
        and stops everything else."""
        why = await process.ended()
        raise StageProcessError(f"{why}. Everything stopped: run `dosewatch up` again")

    def _run(self, name: str, service: Any) -> None:
        runner = self._runners[name] = Runner(service, name, self._ended)
        runner.start()

    async def _cancel(self, name: str) -> None:
        runner = self._runners.pop(name, None)
        if runner is not None:
            await runner.halt()

    def _ended(self, name: str, exc: BaseException | None) -> None:
        if self.failed is None or self.failed.done():
            return
        self.failed.set_result(exc or RuntimeError(f"{name} ended"))

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            self._ended(task.get_name(), task.exception())
