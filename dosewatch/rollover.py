"""Rolling `dosewatch up` over to a fresh embedded broker, before its history slows it down.

The embedded broker (Tansu, in memory) lists every batch a partition has held on each fetch,
so its hops slow as topics grow, and past about 90,000 batches it delivers nothing
(docs/performance.md, "Tenth round"). It keeps no retention and refuses DeleteRecords, so
the only way to a short log is a new broker. `stack.Stack.roll_over` starts one beside it
and moves the stages over one by one, each with its state in hand, to read the new topics
from their start (`roll_over`). The stages may be in this process (`LocalStage`) or
processes of their own, told over HTTP (`RemoteStage`; `bench/pipeline.py`).

A partition's end offset counts its records, and a batch holds at least one, so the largest
end offset bounds the batches any fetch has to list (`largest`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from aiokafka import AIOKafkaProducer, TopicPartition

from services.common import kafka, moving
from services.common.embedded import EmbeddedKafka
from services.common.runner import Runner
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

# Until the input on the old broker is read to the end: up to these offsets ({"ends": ...}),
# or as fetches answered after a moment see it ({"since_ms": ...}); see `moving.Move`.
Condition = dict[str, Any]


def largest(ends: Mapping[TopicPartition, int]) -> tuple[TopicPartition | None, int]:
    """The partition holding the most records, and how many (None, 0 for no partitions)."""
    if not ends:
        return None, 0
    tp = max(ends, key=lambda t: (ends[t], t.topic, t.partition))
    return tp, ends[tp]


async def end_offsets(settings: CommonSettings, topics: list[str]) -> dict[TopicPartition, int]:
    """Each partition's end offset, for the topics that exist."""
    consumer = kafka.reader(settings)
    try:
        await consumer.start()
        await consumer.topics()
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        return dict(await consumer.end_offsets(parts)) if parts else {}
    finally:
        await kafka.stop_client(consumer)


class RolloverAbandoned(RuntimeError):
    """The new broker, or the stages' clients on it, did not start: nothing moved, and the
    stages go on on the broker they had."""


class StageHandle(Protocol):
    name: str

    async def prepare(self, bootstrap: str) -> None: ...
    async def cancel(self) -> None: ...
    async def move(self, condition: Condition) -> dict[str, dict[int, int]]:
        """Move once `condition` holds; where the stage's outputs end on the old broker."""

    async def release(self) -> None:
        """Close what the stage left on the old broker, once every stage has moved."""


class LocalStage:
    """A stage in this process, moved by calling it."""

    def __init__(self, stage: Any, runner: Runner, timeout_s: float = moving.MOVE_TIMEOUT_S):
        self.name: str = stage.name
        self.stage, self.runner, self.timeout_s = stage, runner, timeout_s
        self._left: list[kafka.MovedFrom] = []

    async def prepare(self, bootstrap: str) -> None:
        await self.stage.prepare_move(bootstrap)

    async def cancel(self) -> None:
        await self.stage.cancel_move()

    async def move(self, condition: Condition) -> dict[str, dict[int, int]]:
        done = moving.read_to_end(self.stage, condition.get("ends"), condition.get("since_ms"))
        left = await moving.move_stage(self.stage, self.runner, done, self.timeout_s)
        self._left.append(left)
        return moving.ends_by_topic(left.out)

    async def release(self) -> None:
        left, self._left = self._left, []
        for moved in left:
            await moved.clients.close()


class RemoteStage:
    """A stage running as a process of its own, moved through its control routes
    (DOSEWATCH_CONTROL_TOKEN); it closes its old clients itself, from its move on, and
    `release` waits for that."""

    def __init__(self, name: str, base_url: str, token: str,
                 timeout_s: float = moving.MOVE_TIMEOUT_S) -> None:  # fmt: skip
        self.name, self.timeout_s = name, timeout_s
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s + 10,
                                       headers={"Authorization": f"Bearer {token}"})  # fmt: skip

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        response = await self._http.post(path, json=body)
        if response.is_error:
            raise RuntimeError(f"{self.name}: POST {path} answered {response.status_code}: "
                               f"{response.text}")  # fmt: skip
        return response

    async def prepare(self, bootstrap: str) -> None:
        await self._post("/control/prepare", {"bootstrap": bootstrap})

    async def cancel(self) -> None:
        await self._post("/control/cancel", {})

    async def move(self, condition: Condition) -> dict[str, dict[int, int]]:
        response = await self._post("/control/move", condition | {"timeout_s": self.timeout_s})
        ends: dict[str, dict[str, int]] = response.json()["ends"]
        return {t: {int(p): end for p, end in parts.items()} for t, parts in ends.items()}

    async def release(self) -> None:
        await self._post("/control/release", {})

    async def aclose(self) -> None:
        await self._http.aclose()


def topics(settings: CommonSettings) -> dict[str, dict[str, str]]:
    """Every topic of the pipeline, with its settings."""
    s = settings
    return {s.topic_raw: {}, s.topic_pings: {}, s.topic_dlq: {}, s.topic_visits: {},
            s.topic_status: kafka.COMPACTED, s.topic_audit: {}}  # fmt: skip


async def roll_over(
    broker: EmbeddedKafka,
    settings: CommonSettings,
    stages: Sequence[StageHandle],
    switch_input: Callable[[str], Awaitable[Condition]],
    then: Mapping[str, Callable[[str], Awaitable[None]]] | None = None,
) -> dict[str, float]:
    """Move the stages (ingest, geofence, dosage, in that order) to a fresh embedded broker,
    each between two of its batches: what is in flight keeps flowing.

    A new broker starts beside the old one, and every stage opens clients on it. Then what
    writes the pipeline's input is switched to it (`switch_input`, given its address), which
    says when the old raw topic is read to the end. Ingest moves then; each stage after it
    once it has read up to where the stage before left its outputs on the old broker (that
    stage's acks). A stage that moves saves what it did there and reads its new topics from
    their start, with its state in hand. `then` (name -> step) follows, before the old broker
    is killed: what reads the stages' outputs (the API's feed).

    Should the new broker or a stage's clients on it fail to start, nothing has moved
    (`RolloverAbandoned`). `settings` gives the topics to make. Returns, in seconds, how
    long the new broker took to start and the preparing in all, and when each stage had
    moved, from the input's switch."""
    started = time.monotonic()
    try:
        following = await broker.successor()
    except Exception as exc:
        raise RolloverAbandoned(f"a new broker did not start: {exc!r}") from exc
    broker_s = time.monotonic() - started
    try:
        await kafka.ensure_topics(
            settings.model_copy(update={"kafka_bootstrap": following.bootstrap}), topics(settings)
        )
        await together([stage.prepare(following.bootstrap) for stage in stages])
    except Exception as exc:
        await together([stage.cancel() for stage in stages], raising=False)
        await broker.retire(following.proc)
        raise RolloverAbandoned(f"the stages could not reach the new broker: {exc!r}") from exc
    old = broker.adopt(following)
    steps = {"broker_s": broker_s, "prepare_s": time.monotonic() - started}
    try:
        moving_from = time.monotonic()
        condition = await switch_input(following.bootstrap)
        inputs = [settings.topic_pings, settings.topic_visits]
        for i, stage in enumerate(stages):
            ends = await stage.move(condition)
            steps[f"{stage.name}_s"] = time.monotonic() - moving_from
            if i < len(inputs):
                condition = {"ends": ends.get(inputs[i], {})}
        for name, step in (then or {}).items():
            await step(following.bootstrap)
            steps[f"{name}_s"] = time.monotonic() - moving_from
    finally:
        await together([stage.release() for stage in stages], raising=False)
        await broker.retire(old)
    return {k: round(v, 3) for k, v in steps.items()}


async def together(steps: list[Awaitable[None]], raising: bool = True) -> None:
    """Run steps at once and wait for every one, even when one fails (a stage still starting
    as the stack stops would be left running); then raise the first failure (or, with
    `raising=False`, log it)."""
    outcomes = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            if raising:
                raise outcome
            log.warning("a step of a broker rollover failed", extra={"error": repr(outcome)})


class SwitchedProducer:
    """A producer of the pipeline's input that a rollover switches to the new broker between
    two sends (`switch`, given to `roll_over` as its `switch_input`): it knows from its acks
    where the old raw topic ends, so ingest moves as soon as it has read that far."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: int = 5) -> None:
        self.bootstrap, self.topic, self.linger_ms = bootstrap, topic, linger_ms
        self.lock = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None
        self._out: kafka.BatchProducer | None = None
        self.sends = 0
        self.sends_at_switch: list[int] = []
        self._stopping: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._producer = await self._open(self.bootstrap)
        self._out = kafka.BatchProducer(self._producer)

    async def _open(self, bootstrap: str) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=self.linger_ms)
        await producer.start()
        try:
            await producer.partitions_for(self.topic)  # metadata now, not at the first send
        except BaseException:
            await kafka.stop_client(producer)
            raise
        return producer

    async def send(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Keyed records, a batch per partition, acked."""
        async with self.lock:
            assert self._out is not None
            await self._out.send(self.topic, records)
            self.sends += 1

    async def switch(self, bootstrap: str) -> Condition:
        """Sends wait only while what was sent to the old broker is answered: the producer on
        the new one is started before, the old one stopped after."""
        following = await self._open(bootstrap)
        async with self.lock:
            assert self._producer is not None and self._out is not None
            await self._out.settled()
            self.sends_at_switch.append(self.sends)
            ends = self._out.ends_of(self.topic)
            old, self._producer = self._producer, following
            self._out = kafka.BatchProducer(following)
            self.bootstrap = bootstrap
        self._stopping.append(asyncio.create_task(kafka.stop_client(old)))  # off the move's path
        return {"ends": ends}

    async def stop(self) -> None:
        if self._producer is not None:
            await kafka.stop_client(self._producer)
        await asyncio.gather(*self._stopping)
