"""The stack's helpers that need no broker: starting stages (and a rollover's steps) together."""

from __future__ import annotations

import asyncio

import pytest

from dosewatch.rollover import together


def test_together_waits_for_every_step_before_raising_the_first_failure() -> None:
    """A stage still starting when another failed would be left running by the stop that
    follows: every step ends before the failure is raised."""
    finished: list[str] = []

    async def fails() -> None:
        raise RuntimeError("no database")

    async def slow(name: str) -> None:
        await asyncio.sleep(0.2)
        finished.append(name)

    async def scenario() -> None:
        await together([slow("geofence"), fails(), slow("dosage")])

    with pytest.raises(RuntimeError, match="no database"):
        asyncio.run(scenario())
    assert sorted(finished) == ["dosage", "geofence"]


def test_together_runs_the_steps_at_once() -> None:
    """Each stage's start opens clients and loads its state (and, in a consumer group, waits
    about 2 s for it to form): one after another, they add up."""
    started: list[int] = []
    seen_at_end: list[int] = []

    async def step(i: int) -> None:
        started.append(i)
        await asyncio.sleep(0)  # run one after another, the others would not have begun
        seen_at_end.append(len(started))

    asyncio.run(together([step(i) for i in range(3)]))
    assert seen_at_end == [3, 3, 3]
