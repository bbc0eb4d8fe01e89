"""The ingest service: raw AVL input (Kafka or HTTP) -> validated, normalised pings.

Stateless: its progress is its Kafka consumer offsets, committed after the outputs are acked,
so a crash repeats a few pings at worst, and the rules treat a repeated ping as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from schemas.ping import PingError
from services.common import kafka
from services.common.fetched import FetchedRecord
from services.common.http import HttpServer, probe_app
from services.common.lag import LagWatch
from services.common.metrics import EVENTS_OUT, LATENCY, PINGS_IN, PINGS_REJECTED
from services.common.moving import MovingParts, run_stage
from services.common.settings import CommonSettings
from services.ingest.core.fast import FastNormaliser, Normalised, normalise_each
from services.ingest.core.normalise import (
    Accepted,
    Limits,
    Rejected,
    dead_letter,
    from_osmand,
    normalise_message,
)

log = logging.getLogger(__name__)
SERVICE = "ingest"
_In = TypeVar("_In", bytes, dict[str, str])


class IngestSettings(CommonSettings):
    group_id: str = "dosewatch-ingest"
    max_future_s: float = Field(60.0, ge=0)
    max_message_bytes: int = Field(1_000_000, ge=1024)
    max_body_bytes: int = Field(5_000_000, ge=1024)
    max_pings_per_request: int = Field(10_000, ge=1)


class IngestService(MovingParts):
    name = SERVICE

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.ready = False
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._out: kafka.BatchProducer | None = None
        self._consumed: dict[TopicPartition, int] = {}  # the next offsets, since the last commit
        self._committing: asyncio.Task[None] | None = None
        self._stepping: asyncio.Task[None] | None = None
        self._last_commit = 0.0
        self._next: tuple[IngestSettings, kafka.Clients, kafka.Held] | None = (
            None  # see `prepare_move`
        )
        self._lag = LagWatch(SERVICE, settings.consumer_stall_s)
        # Well-formed single pings the fast way; every other message by the rules, guarded.
        self._rules = functools.partial(_guarded, normalise_message)
        self._normaliser = FastNormaliser(self._rules)
        self.http = HttpServer(self.app(), settings.http_host, settings.http_port)

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, {s.topic_raw: {}, s.topic_pings: {}, s.topic_dlq: {}})
        clients = await kafka.open_clients(s, s.group_id, s.topic_raw)
        self._producer, self._consumer = clients.producer, clients.consumer
        self._out = kafka.BatchProducer(self._producer)
        await self.http.start()
        self.ready = True
        log.info("ingest ready", extra={"http_port": self.http.port, "topic": s.topic_raw})

    async def stop(self) -> None:
        self.ready = False
        await self.http.stop()
        if self._stepping is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._stepping, 10)
        if self._committing is not None:
            try:
                await self._committing
            except Exception:
                log.exception("the last commit failed; a restart repeats its pings")
        if self._consumer is not None:
            await kafka.stop_client(self._consumer)
        if self._producer is not None:
            await kafka.stop_client(self._producer)
        await self.cancel_move()

    # -- moving to another broker (`dosewatch up`'s embedded one, renewed) --------------------

    async def prepare_move(self, bootstrap: str) -> None:
        """Open clients on another broker, one whose topics are new; `move` takes them up.
        The raw topic there is read from offset 0 (`kafka.Held`)."""
        s = self.settings.model_copy(update={"kafka_bootstrap": bootstrap})
        held = kafka.Held()
        clients = await self.open_next(s, s.group_id, s.topic_raw, [s.topic_pings, s.topic_dlq],
                                       held)  # fmt: skip
        self._next = s, clients, held

    def input_consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None
        return self._consumer

    async def move(self) -> kafka.MovedFrom:
        """Once `run` has stopped, having read the old broker's raw topic to the end: go on
        with the clients `prepare_move` opened. The HTTP intake sends to the new broker from
        then on; what it sent to the old one is acked before this returns. Nothing is
        committed there: that broker is on its way out, and its commits would never be read."""
        assert self._next is not None and self._consumer is not None
        assert self._producer is not None and self._out is not None
        if self._stepping is not None:
            await self._stepping
        committing, self._committing = self._committing, None
        if committing is not None:  # may fail as the old clients close; nothing reads it
            committing.add_done_callback(_forgotten)
        left = kafka.MovedFrom(kafka.Clients(self._producer, self._consumer), self._out)
        self.settings, clients, held = self._next
        self._producer, self._consumer = clients.producer, clients.consumer
        held.release()
        self._out = kafka.BatchProducer(self._producer)
        self._consumed, self._next = {}, None
        await left.out.settled()
        return left

    async def run(self) -> None:
        assert self._consumer is not None and self._out is not None
        consumer = self._consumer
        while True:
            if self._committing is not None and self._committing.done():
                self._committing.result()  # a failed ack or commit stops the service, as before
            batches = await consumer.getmany(timeout_ms=100)
            self._lag.fetched(consumer, batches, time.monotonic())
            if not batches:
                if self._consumed and time.monotonic() - self._last_commit > 1.0:
                    self._commit()
                continue
            # Shielded: a stop or a move waits for the batch (`stop`, `move`) instead of cutting it
            # between taking its records and queueing its outputs.
            self._stepping = asyncio.create_task(self._step(batches))
            await asyncio.shield(self._stepping)

    async def _step(self, batches: dict[TopicPartition, list[FetchedRecord]]) -> None:
        keys: list[bytes] = []
        values: list[bytes] = []
        newest: list[int] = []
        dead: list[bytes] = []
        for tp, records in batches.items():
            raws = [r.value or b"" for r in records]
            done = self._normalise(raws)
            keys += done.keys
            values += done.values
            if done.newest_ms is not None:
                newest.append(done.newest_ms)
            for k, bad in done.rejected:
                source = {"topic": tp.topic, "partition": tp.partition,
                          "offset": records[k].offset}  # fmt: skip
                dead.append(dead_letter(raws[k], bad, source))
            self._count(done.pings, [r for _, bad in done.rejected for r in bad], "kafka")
            self._consumed[tp] = records[-1].offset + 1
        # Not waiting for the acks here lets the next fetch overlap them; the commit does.
        await self._publish(zip(keys, values, strict=True), len(keys), newest, dead, wait=False)
        now = time.monotonic()
        if now - self._last_commit >= self.settings.commit_interval_ms / 1000:
            # At least once: a crash repeats at most an interval of pings, which the
            # rules discard as duplicates.
            self._commit()
            self._last_commit = now

    def _commit(self) -> None:
        """Commit the offsets consumed so far once their outputs are acked, in the background:
        waiting for the acks and the commit in the loop held up the next fetch (a stall every
        commit interval, in the pipeline's tail latency). Commits stay in order, each after
        the one before; one that fails fails every later one and then the loop (`run`)."""
        assert self._out is not None
        offsets, self._consumed = self._consumed, {}
        acks = self._out.take_unacked()
        self._committing = asyncio.create_task(self._commit_after(self._committing, acks, offsets))

    async def _commit_after(
        self,
        previous: asyncio.Task[None] | None,
        acks: list[asyncio.Future[Any]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        assert self._consumer is not None
        if previous is not None:
            await previous
        if acks:
            await asyncio.gather(*acks)
        # A partition revoked meanwhile is another member's now; it resumes from the last
        # commit, and repeats what this one took since (at least once).
        assigned = self._consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if mine:
            await self._consumer.commit(mine)

    def _normalise(self, raws: Sequence[bytes]) -> Normalised:
        """A partition's batch, the fast way; should the fast path itself fail (a bug), the
        batch goes message by message through the guarded rules, which decide it as before."""
        limits = self._limits()
        try:
            return self._normaliser.batch(raws, limits)
        except Exception:
            log.exception("fast normalising failed; the batch goes the slow way")
        return normalise_each(raws, limits, self._rules)

    async def _publish(
        self,
        records: Iterable[tuple[bytes, bytes]],
        count: int,
        newest_ms: Sequence[int],
        dead: Sequence[bytes],
        wait: bool = True,
    ) -> None:
        assert self._out is not None
        s = self.settings
        if count:
            await self._out.send(s.topic_pings, records, wait=wait)
            EVENTS_OUT.labels(SERVICE, s.topic_pings).inc(count)
            # One sample per partition batch (or request): the age of its newest ping. A sample
            # per ping cost about as much CPU as normalising the ping the fast way; the newest
            # ping shows how far behind this stage runs (older pings in a batch were already
            # old when they came), and a partition that falls behind still shows as its own
            # sample. Geofence and dosage also sample their batch's newest ping.
            now = time.time()
            histogram = LATENCY.labels(SERVICE)
            for ms in newest_ms:
                histogram.observe(max(0.0, now - ms / 1000))
        if dead:
            await self._out.send(s.topic_dlq, ((None, d) for d in dead), wait=wait)
            EVENTS_OUT.labels(SERVICE, s.topic_dlq).inc(len(dead))

    def _limits(self) -> Limits:
        s = self.settings
        return Limits(int(time.time() * 1000), round(s.max_future_s * 1000), s.max_message_bytes)

    @staticmethod
    def _count(pings: int, bad: Sequence[Rejected], source: str) -> None:
        PINGS_IN.labels(SERVICE, source).inc(pings)
        for r in bad:
            PINGS_REJECTED.labels(SERVICE, r.reason).inc()

    # -- HTTP intake for gateways that cannot write to Kafka --------------------------------

    def app(self) -> FastAPI:
        app = probe_app(SERVICE, lambda: self.ready)

        @app.post("/v1/pings")
        async def post_pings(request: Request) -> JSONResponse:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
                return _problem(413, f"body over {self.settings.max_body_bytes} bytes")
            body = await request.body()
            if len(body) > self.settings.max_body_bytes:
                return _problem(413, f"body over {self.settings.max_body_bytes} bytes")
            limits = self._limits()
            fast = _guarded_one(self._normaliser, body, limits)
            if fast is not None:  # one well-formed ping: the common case
                key, value, ts = fast
                return await self._intake([(key, value)], [ts], [], body, "http")
            ok, bad = self._rules(body, limits)
            if len(ok) + len(bad) > self.settings.max_pings_per_request:
                return _problem(413, f"over {self.settings.max_pings_per_request} pings")
            if bad and bad[0].errors[0].field == "(message)":
                return _problem(400, bad[0].errors[0].reason)
            return await self._intake(*_unpack(ok), bad, body, "http")

        @app.api_route("/osmand", methods=["GET", "POST"])
        @app.api_route("/", methods=["POST"], include_in_schema=False)
        async def osmand(request: Request) -> JSONResponse:
            params = dict(request.query_params)
            if request.method == "POST" and not params:
                form = await request.form()
                params = {k: str(v) for k, v in form.items()}
            ok, bad = _guarded(from_osmand, params, self._limits())
            raw = str(request.url.query).encode() or await request.body()
            return await self._intake(*_unpack(ok), bad, raw, "osmand")

        return app

    async def _intake(
        self,
        ok: list[tuple[bytes, bytes]],
        times: list[int],
        bad: list[Rejected],
        raw: bytes,
        source: str,
    ) -> JSONResponse:
        if not self.ready:
            # Starting or stopping: soon back (or another instance takes it).
            return _problem(503, "not ready", {"Retry-After": "1"})
        self._count(len(ok) + len(bad), bad, source)
        dead = [dead_letter(raw, bad, {"http": source})] if bad else []
        await self._publish(ok, len(ok), [max(times)] if times else [], dead)
        rejected = [{"index": r.index, "errors": [e.model_dump() for e in r.errors]} for r in bad]
        status = 200 if ok or not bad else 422
        return JSONResponse({"accepted": len(ok), "rejected": rejected}, status_code=status)


def _forgotten(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("a commit on the broker moved from did not finish", extra={
            "error": repr(task.exception())})  # fmt: skip


def _guarded(
    rule: Callable[[_In, Limits], tuple[list[Accepted], list[Rejected]]], raw: _In, limits: Limits
) -> tuple[list[Accepted], list[Rejected]]:
    """A bug in the rules must cost one dead letter, not a stopped consumer (a poison message
    would stop it again after every restart) or a 500."""
    try:
        return rule(raw, limits)
    except Exception as exc:
        log.exception("normalising failed; dead-lettered")
        reason = f"internal error while validating ({type(exc).__name__}); reported"
        return [], [Rejected([PingError(field="(message)", reason=reason)], None)]


def _guarded_one(
    normaliser: FastNormaliser, raw: bytes, limits: Limits
) -> tuple[bytes, bytes, int] | None:
    """The fast path for one message; a bug in it sends the message the rules' way."""
    try:
        return normaliser.one(raw, limits)
    except Exception:
        log.exception("fast normalising failed; the message goes the slow way")
        return None


def _unpack(ok: list[Accepted]) -> tuple[list[tuple[bytes, bytes]], list[int]]:
    return [(a.key, a.value) for a in ok], [a.ping.ts for a in ok]


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def main(settings: IngestSettings | None = None) -> None:
    await run_stage(IngestService(settings or IngestSettings()))


__all__ = ["IngestService", "IngestSettings", "main"]
