"""Moving a stage to another broker between two of its batches, with its state in hand.

The embedded broker slows as its topics grow, and the only way to short topics is a new
broker (`dosewatch.rollover`). A stage first opens clients on the new one (`prepare_move`);
once it has read its input on the old broker to the end, its loop stops between two batches,
it saves what it did there (outputs acked, state and offsets), and it goes on reading the new
topics from their start (`move`). `dosewatch up` moves the stages in its own process; a stage
running as a process of its own is told over HTTP (`control_router`, enabled by
DOSEWATCH_CONTROL_TOKEN) by whoever renews the broker.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field, SecretStr, model_validator

from services.common import kafka
from services.common.runner import Runner, run_service
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)
MOVE_TIMEOUT_S = 60.0


class Movable(Protocol):
    name: str

    @property
    def prepared(self) -> bool: ...
    async def prepare_move(self, bootstrap: str) -> None: ...
    async def cancel_move(self) -> None: ...
    async def reached(self, ends: Mapping[int, int]) -> bool: ...
    async def drained(self, since_ms: float) -> bool: ...
    async def move(self) -> kafka.MovedFrom: ...


class MovingParts:
    """What ingest and the stateful stages share of a move: the clients opened ahead of it
    (`_next`: the settings for the new broker, the clients, their `kafka.Held` listener),
    and whether the input on the old broker has been read to the end."""

    _next: tuple[Any, kafka.Clients, kafka.Held] | None

    def input_consumer(self) -> AIOKafkaConsumer:
        raise NotImplementedError

    @staticmethod
    async def open_next(
        settings: CommonSettings, group_id: str, topic: str, outputs: list[str], held: kafka.Held
    ) -> kafka.Clients:
        """Clients on the new broker, their partitions held until the move."""
        clients = await kafka.open_clients(settings, group_id, topic, held.bind, outputs)
        held.hold()
        return clients

    @property
    def prepared(self) -> bool:
        return self._next is not None

    async def cancel_move(self) -> None:
        """Close the clients `prepare_move` opened, if any (the move did not come)."""
        if self._next is not None:
            clients = self._next[1]
            self._next = None
            await clients.close()

    async def reached(self, ends: Mapping[int, int]) -> bool:
        """Whether every record before `ends` (partition -> offset) has been handed out."""
        return await kafka.reached(self.input_consumer(), ends)

    async def drained(self, since_ms: float) -> bool:
        """Whether every record has been handed out, as of `since_ms` (`kafka.caught_up`)."""
        return await kafka.caught_up(self.input_consumer(), since_ms)


class Stuck(RuntimeError):
    """A stage did not read its input on the old broker to the end in time."""


async def until(done: Callable[[], Awaitable[bool]], who: str, timeout_s: float) -> None:
    """Poll `done` until it holds; a stage reads its input's last records within
    milliseconds, unless it is far behind."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await done():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise Stuck(
            f"broker rollover stuck: {who} did not read its input on the old broker to the end "
            f"in {timeout_s:g} s"
        ) from None


async def move_stage(
    stage: Movable, runner: Runner, done: Callable[[], Awaitable[bool]], timeout_s: float
) -> kafka.MovedFrom:
    """Once `done` holds: stop the stage's loop between two batches, move it, and start the
    loop again on the new broker. A move that fails once the loop has stopped is the stage's
    failure (`Runner.fail`): it is on neither broker, and a restart loads its saved state."""
    await until(done, stage.name, timeout_s)
    await runner.halt()
    try:
        left = await stage.move()
    except Exception as exc:
        runner.fail(exc)
        raise
    runner.start()
    return left


def read_to_end(
    stage: Movable, ends: Mapping[int, int] | None, since_ms: float | None
) -> Callable[[], Awaitable[bool]]:
    """Whether the stage has read its input on the old broker to the end: up to `ends`, or
    else as fetches answered after `since_ms` see it."""
    if ends is not None:
        return partial(stage.reached, ends)
    assert since_ms is not None
    return partial(stage.drained, since_ms)


def ends_by_topic(out: kafka.BatchProducer) -> dict[str, dict[int, int]]:
    """Topic -> partition -> the offset after the last record acked there."""
    found: dict[str, dict[int, int]] = {}
    for (topic, partition), end in out.ends.items():
        found.setdefault(topic, {})[partition] = end
    return found


# -- over HTTP, for a stage that runs as a process of its own --------------------------------


class Prepare(BaseModel):
    bootstrap: str = Field(min_length=1, description="host:port of the new broker")


class Move(BaseModel):
    """When the old broker's input is read to the end: up to `ends` (where the stage before
    left its outputs, from its acks), or as fetches answered after `since_ms` see it (when
    what wrote the input is outside anyone's control; see `kafka.caught_up`)."""

    ends: dict[int, int] | None = Field(None, description="partition -> offset")
    since_ms: float | None = Field(None, description="wall clock, ms since the epoch")
    timeout_s: float = Field(MOVE_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _one_way(self) -> Move:
        if (self.ends is None) == (self.since_ms is None):
            raise ValueError("give exactly one of ends and since_ms")
        return self


class Moved(BaseModel):
    took_s: float
    ends: dict[str, dict[int, int]] = Field(
        description="topic -> partition -> offset after this stage's last output on the old broker"
    )


def control_router(stage: Movable, runner: Runner, token: SecretStr) -> APIRouter:
    """POST /control/prepare, /control/move, /control/release and /control/cancel, for
    bearers of `token`."""
    expected = f"Bearer {token.get_secret_value()}".encode()

    def authorised(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "control needs 'Authorization: Bearer <control token>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    router = APIRouter(prefix="/control", dependencies=[Depends(authorised)])
    one_at_a_time = asyncio.Lock()
    closing: set[asyncio.Task[Any]] = set()

    @router.post("/prepare", status_code=204)
    async def prepare(body: Prepare) -> None:
        async with one_at_a_time:
            await stage.cancel_move()  # a prepare asked again replaces the one before
            try:
                await stage.prepare_move(body.bootstrap)
            except Exception as exc:
                raise HTTPException(502, f"no clients on {body.bootstrap}: {exc!r}") from exc
        log.info("prepared to move", extra={"bootstrap": body.bootstrap})

    @router.post("/cancel", status_code=204)
    async def cancel() -> None:
        async with one_at_a_time:
            await stage.cancel_move()

    @router.post("/release", status_code=204)
    async def release() -> None:
        """Once every stage has moved, before the old broker goes: the old clients closed
        (which began right after the move), so none of them looks for that broker."""
        await asyncio.gather(*list(closing), return_exceptions=True)

    @router.post("/move")
    async def move(body: Move) -> Moved:
        async with one_at_a_time:
            if not stage.prepared:
                raise HTTPException(409, "nothing prepared: POST /control/prepare first")
            started = time.monotonic()
            done = read_to_end(stage, body.ends, body.since_ms)
            try:
                left = await move_stage(stage, runner, done, body.timeout_s)
            except Stuck as exc:
                raise HTTPException(504, str(exc)) from exc
            took = time.monotonic() - started
            # Its outputs there are acked: the old clients have nothing left to do.
            task = asyncio.create_task(left.clients.close())
            closing.add(task)
            task.add_done_callback(closing.discard)
        log.info("moved to another broker", extra={"took_s": round(took, 3)})
        return Moved(took_s=took, ends=ends_by_topic(left.out))

    return router


async def run_stage(stage: Any) -> None:
    """`run_service` for a stage, with the control routes on its HTTP port when
    DOSEWATCH_CONTROL_TOKEN is set."""
    token: SecretStr | None = stage.settings.control_token

    def control(runner: Runner) -> None:
        if token is not None:
            stage.http.app.include_router(control_router(stage, runner, token))

    await run_service(stage, control)
