"""The visit state machine alone (services/dosage/core/visit.py), table-driven.

Times are epoch milliseconds; every table row starts from a visit opened at T0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.dosage.core.params import DosageParams, ZoneRules
from services.dosage.core.visit import (
    EndReason,
    IllegalTransition,
    Moment,
    Visit,
    VisitState,
    Where,
)

T0 = 1_780_000_000_000
RULES = ZoneRules(min_visit_ms=120_000, target_ms=900_000, max_visit_ms=1_200_000)
CONFIRM = 60_000

IN, NEAR, OUT = Where.INSIDE, Where.NEAR, Where.OUTSIDE


def opened() -> Visit:
    return Visit.open("u1", "Z1", T0)


def drive(
    visit: Visit, steps: list[tuple[Where, int]], confirm: int = CONFIRM, rules: ZoneRules = RULES
) -> list[list[Moment]]:
    """Feed (where, ms after T0) steps; the moments each step caused."""
    return [list(visit.observe(where, T0 + dt, rules, confirm)) for where, dt in steps]


@dataclass(frozen=True)
class Row:
    steps: list[tuple[Where, int]]
    state: VisitState
    last_in: int  # ms after T0
    out_since: int | None  # ms after T0
    end_reason: EndReason | None
    last_moments: list[Moment]
    confirm: int = CONFIRM


TRANSITIONS: dict[str, Row] = {
    "open+inside stays open": Row([(IN, 10_000)], VisitState.OPEN, 10_000, None, None, []),
    "open+near stays open, near counts as in": Row(
        [(NEAR, 10_000)], VisitState.OPEN, 10_000, None, None, []
    ),
    "open+outside starts an exit": Row(
        [(OUT, 10_000)], VisitState.EXIT_PENDING, 0, 10_000, None, []
    ),
    "pending+inside cancels the exit": Row(
        [(OUT, 10_000), (IN, 20_000)], VisitState.OPEN, 20_000, None, None, []
    ),
    "pending+near cancels the exit": Row(
        [(OUT, 10_000), (NEAR, 20_000)], VisitState.OPEN, 20_000, None, None, []
    ),
    "pending+outside keeps the first out_since": Row(
        [(OUT, 10_000), (OUT, 30_000)], VisitState.EXIT_PENDING, 0, 10_000, None, []
    ),
    "exit confirmed at exactly exit_confirm": Row(
        [(IN, 5_000), (OUT, 10_000), (OUT, 10_000 + CONFIRM)],
        VisitState.CLOSED,
        5_000,
        10_000,
        EndReason.EXITED,
        [Moment.ENDED],
    ),
    "exit not confirmed 1 ms before exit_confirm": Row(
        [(IN, 5_000), (OUT, 10_000), (OUT, 10_000 + CONFIRM - 1)],
        VisitState.EXIT_PENDING,
        5_000,
        10_000,
        None,
        [],
    ),
    "exit clock restarts after a cancelled exit": Row(
        [(OUT, 10_000), (NEAR, 20_000), (OUT, 30_000), (OUT, 10_000 + CONFIRM)],
        VisitState.EXIT_PENDING,
        20_000,
        30_000,
        None,
        [],
    ),
    "exit confirmed after a restarted exit clock": Row(
        [(OUT, 10_000), (NEAR, 20_000), (OUT, 30_000), (OUT, 30_000 + CONFIRM)],
        VisitState.CLOSED,
        20_000,
        30_000,
        EndReason.EXITED,
        [Moment.ENDED],
    ),
    "exit_confirm 0 closes on the first outside ping": Row(
        [(IN, 7_000), (OUT, 8_000)],
        VisitState.CLOSED,
        7_000,
        8_000,
        EndReason.EXITED,
        [Moment.ENDED],
        confirm=0,
    ),
    "exit_confirm 0 still keeps near as in": Row(
        [(NEAR, 7_000), (NEAR, 8_000)], VisitState.OPEN, 8_000, None, None, [], confirm=0
    ),
}


@pytest.mark.parametrize("row", list(TRANSITIONS.values()), ids=list(TRANSITIONS))
def test_transition_table(row: Row) -> None:
    visit = opened()
    moments = drive(visit, row.steps, confirm=row.confirm)
    assert visit.state is row.state
    assert visit.is_open is (row.state is not VisitState.CLOSED)
    assert visit.last_in == T0 + row.last_in
    assert visit.duration_ms == row.last_in
    assert visit.out_since == (None if row.out_since is None else T0 + row.out_since)
    assert visit.end_reason is row.end_reason
    assert visit.last_seen == T0 + row.steps[-1][1]
    assert moments[-1] == row.last_moments
    assert visit.started_at == T0


def test_open_visit_starts_at_its_first_ping() -> None:
    visit = opened()
    assert (visit.state, visit.started_at, visit.last_in, visit.duration_ms) == (
        VisitState.OPEN,
        T0,
        T0,
        0,
    )
    assert visit.out_since is None and visit.end_reason is None


def test_outside_pings_do_not_extend_the_visit() -> None:
    """Only inside/near moves last_in: an excursion that ends the visit is not credited."""
    visit = opened()
    drive(visit, [(IN, 30_000), (OUT, 40_000), (OUT, 70_000), (OUT, 100_000)])
    assert visit.state is VisitState.CLOSED
    assert visit.last_in == T0 + 30_000


# -- moments: target met and overstay --------------------------------------------------------

MOMENTS: dict[str, tuple[list[tuple[Where, int]], list[list[Moment]]]] = {
    "one ms short of target: nothing": ([(IN, RULES.target_ms - 1)], [[]]),
    "exactly target: target met": ([(IN, RULES.target_ms)], [[Moment.TARGET_MET]]),
    "near ping reaching target: target met": ([(NEAR, RULES.target_ms)], [[Moment.TARGET_MET]]),
    "outside ping at target: not met (not credited yet)": ([(OUT, RULES.target_ms)], [[]]),
    "credited after a cancelled exit": (
        [(OUT, 100_000), (IN, RULES.target_ms + 5)],
        [[], [Moment.TARGET_MET]],
    ),
    "target met fires once": (
        [(IN, RULES.target_ms), (IN, RULES.target_ms + 1), (NEAR, RULES.target_ms + 2)],
        [[Moment.TARGET_MET], [], []],
    ),
    "exactly max_visit: no overstay": (
        [(IN, RULES.target_ms), (IN, RULES.max_visit_ms)],
        [[Moment.TARGET_MET], []],
    ),
    "one ms past max_visit: overstay, once": (
        [
            (IN, RULES.target_ms),
            (IN, RULES.max_visit_ms),
            (IN, RULES.max_visit_ms + 1),
            (IN, RULES.max_visit_ms + 2),
        ],
        [[Moment.TARGET_MET], [], [Moment.OVERSTAY], []],
    ),
    "one jump past both: target then overstay": (
        [(IN, 1_000), (IN, RULES.max_visit_ms + 1)],
        [[], [Moment.TARGET_MET, Moment.OVERSTAY]],
    ),
    "overstay survives an exit attempt, not repeated": (
        [(IN, RULES.max_visit_ms + 1), (OUT, RULES.max_visit_ms + 2), (IN, RULES.max_visit_ms + 3)],
        [[Moment.TARGET_MET, Moment.OVERSTAY], [], []],
    ),
}


@pytest.mark.parametrize(("steps", "expected"), list(MOMENTS.values()), ids=list(MOMENTS))
def test_moment_table(steps: list[tuple[Where, int]], expected: list[list[Moment]]) -> None:
    visit = opened()
    assert drive(visit, steps) == expected
    fired = [m for ms in expected for m in ms]
    assert visit.target_reported is (Moment.TARGET_MET in fired)
    assert visit.overstay_reported is (Moment.OVERSTAY in fired)


@pytest.mark.parametrize(
    ("target_ms", "max_ms", "dt", "expected"),
    [
        (60_000, 90_000, 59_999, []),
        (60_000, 90_000, 60_000, [Moment.TARGET_MET]),
        (60_000, 90_000, 90_000, [Moment.TARGET_MET]),
        (60_000, 90_000, 90_001, [Moment.TARGET_MET, Moment.OVERSTAY]),
        (900_000, 1_200_000, 90_001, []),
    ],
)
def test_moments_follow_the_zone_rules(
    target_ms: int, max_ms: int, dt: int, expected: list[Moment]
) -> None:
    rules = ZoneRules(min_visit_ms=0, target_ms=target_ms, max_visit_ms=max_ms)
    assert list(opened().observe(IN, T0 + dt, rules, CONFIRM)) == expected


def test_moments_stop_after_exit() -> None:
    visit = opened()
    moments = drive(visit, [(OUT, 10_000), (OUT, 10_000 + CONFIRM)])
    assert moments == [[], [Moment.ENDED]]
    assert not visit.target_reported


def test_default_params_give_the_machine_its_numbers() -> None:
    params = DosageParams()
    rules = params.rules_for()
    assert rules == RULES
    assert params.exit_confirm_ms == CONFIRM
    assert params.rules_for(target_s=60, min_visit_s=30.5, max_visit_s=90) == ZoneRules(
        min_visit_ms=30_500, target_ms=60_000, max_visit_ms=90_000
    )


# -- illegal transitions -----------------------------------------------------------------------


def closed_by_exit() -> Visit:
    visit = opened()
    drive(visit, [(OUT, 1_000), (OUT, 1_000 + CONFIRM)])
    assert visit.state is VisitState.CLOSED
    return visit


def closed_by_call() -> Visit:
    visit = opened()
    visit.close(EndReason.SIGNAL_LOST)
    return visit


@pytest.mark.parametrize("make", [closed_by_exit, closed_by_call], ids=["exited", "closed"])
@pytest.mark.parametrize("where", [IN, NEAR, OUT])
def test_observe_after_close_is_illegal(make: Callable[[], Visit], where: Where) -> None:
    visit = make()
    reason = visit.end_reason
    with pytest.raises(IllegalTransition):
        visit.observe(where, T0 + 10_000_000, RULES, CONFIRM)
    assert visit.state is VisitState.CLOSED
    assert visit.end_reason is reason


@pytest.mark.parametrize("first", list(EndReason))
@pytest.mark.parametrize("second", list(EndReason))
def test_close_twice_is_illegal(first: EndReason, second: EndReason) -> None:
    visit = opened()
    visit.close(first)
    assert visit.end_reason is first and not visit.is_open
    with pytest.raises(IllegalTransition):
        visit.close(second)
    assert visit.end_reason is first


def test_close_after_exit_is_illegal() -> None:
    visit = closed_by_exit()
    with pytest.raises(IllegalTransition):
        visit.close(EndReason.END_OF_INPUT)
    assert visit.end_reason is EndReason.EXITED


@pytest.mark.parametrize(
    ("prior", "ts"),
    [
        ([], 0),  # same ts as the opening ping
        ([], -1),  # before the opening ping
        ([(IN, 5_000)], 5_000),  # duplicate of the last observation
        ([(IN, 5_000)], 4_999),  # late
        ([(OUT, 5_000)], 5_000),  # duplicate while an exit is pending
        ([(OUT, 5_000)], 1_000),  # late while an exit is pending
    ],
    ids=["same-as-open", "before-open", "dup", "late", "dup-pending", "late-pending"],
)
@pytest.mark.parametrize("where", [IN, NEAR, OUT])
def test_non_increasing_ts_is_illegal_and_changes_nothing(
    prior: list[tuple[Where, int]], ts: int, where: Where
) -> None:
    visit = opened()
    drive(visit, prior)
    before = (visit.state, visit.last_in, visit.last_seen, visit.out_since, visit.end_reason)
    with pytest.raises(IllegalTransition):
        visit.observe(where, T0 + ts, RULES, CONFIRM)
    after = (visit.state, visit.last_in, visit.last_seen, visit.out_since, visit.end_reason)
    assert after == before
    # The machine is still usable afterwards.
    assert list(visit.observe(IN, visit.last_seen + 1, RULES, CONFIRM)) == []
    assert visit.state is VisitState.OPEN
