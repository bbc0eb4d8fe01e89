"""The visit state machine for one unit in one zone.

In the style of h11: no I/O, every transition in `_TRANSITIONS`, and anything else raises
`IllegalTransition` instead of being guessed at. `step` is the machine itself, over a visit
held as a row of integers: the tracker runs it compiled over its table of open visits, and
`Visit` runs it on one visit as an object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np
import numpy.typing as npt

from services.dosage.core.compiled import compiled
from services.dosage.core.params import ZoneRules


# IntEnum: these are hashed once per ping and zone, and int hashing stays in C.
class Where(IntEnum):
    """Where a usable ping stands relative to one zone."""

    INSIDE = 0
    NEAR = 1  # outside, but within exit_buffer_m: hysteresis against GPS jitter
    OUTSIDE = 2


class VisitState(IntEnum):
    OPEN = 0
    EXIT_PENDING = 1  # outside the ring, waiting for exit_confirm_s
    CLOSED = 2


class EndReason(StrEnum):
    EXITED = "exited"
    SIGNAL_LOST = "signal_lost"
    END_OF_INPUT = "end_of_input"
    ZONE_CHANGED = "zone_changed"


class Moment(StrEnum):  # StrEnum: hashed (as a dict key) in C
    """Things worth telling the world that a single observation can cause."""

    TARGET_MET = "target_met"
    OVERSTAY = "overstay"
    ENDED = "ended"


class IllegalTransition(RuntimeError):
    """A caller asked the machine for something the rules do not allow."""


# (state, where) -> state, before the exit-confirmation check. Nothing else is legal.
_TRANSITIONS: dict[tuple[VisitState, Where], VisitState] = {
    (VisitState.OPEN, Where.INSIDE): VisitState.OPEN,
    (VisitState.OPEN, Where.NEAR): VisitState.OPEN,
    (VisitState.OPEN, Where.OUTSIDE): VisitState.EXIT_PENDING,
    (VisitState.EXIT_PENDING, Where.INSIDE): VisitState.OPEN,
    (VisitState.EXIT_PENDING, Where.NEAR): VisitState.OPEN,
    (VisitState.EXIT_PENDING, Where.OUTSIDE): VisitState.EXIT_PENDING,
}
# The same table as compiled code reads it: [state, where], -1 where nothing is legal.
_TABLE = np.full((len(VisitState), len(Where)), -1, dtype=np.int64)
for (_state, _where), _next in _TRANSITIONS.items():
    _TABLE[_state, _where] = _next

# A visit as a row of int64: its own fields first (the tracker's table appends its own).
STARTED, LAST_IN, LAST_SEEN, OUT_SINCE, STATE, TARGET_REPORTED, OVERSTAY_REPORTED = range(7)
VISIT_FIELDS = 7
NO_TIME = np.iinfo(np.int64).min  # "None" for a time held in an int64 column

# The moments `step` reports, as bits, in the order they are told.
TARGET_MET_BIT, OVERSTAY_BIT, ENDED_BIT = 1, 2, 4
_MOMENT_BITS = ((TARGET_MET_BIT, Moment.TARGET_MET), (OVERSTAY_BIT, Moment.OVERSTAY),
                (ENDED_BIT, Moment.ENDED))  # fmt: skip

_OPEN, _CLOSED = int(VisitState.OPEN), int(VisitState.CLOSED)


@compiled
def step(
    visit: npt.NDArray[np.int64],
    where: int,
    ts: int,
    target_ms: int,
    max_visit_ms: int,
    exit_confirm_ms: int,
) -> int:
    """Judge one usable ping of this visit's unit; return the moments it caused, as bits.
    An ended visit is left CLOSED: its reason (exited) is the caller's to record."""
    if visit[STATE] == _CLOSED:
        raise IllegalTransition("the visit is closed")
    if ts <= visit[LAST_SEEN]:
        raise IllegalTransition("a ping not after the visit's previous ping")
    state = _TABLE[visit[STATE], where]
    visit[STATE] = state
    visit[LAST_SEEN] = ts
    if state == _OPEN:
        visit[LAST_IN] = ts  # the time in between stays credited: a short excursion is jitter
        visit[OUT_SINCE] = NO_TIME
        moments = 0
        duration = ts - visit[STARTED]
        if not visit[TARGET_REPORTED] and duration >= target_ms:
            visit[TARGET_REPORTED] = 1
            moments |= TARGET_MET_BIT
        if not visit[OVERSTAY_REPORTED] and duration > max_visit_ms:
            visit[OVERSTAY_REPORTED] = 1
            moments |= OVERSTAY_BIT
        return moments
    if visit[OUT_SINCE] == NO_TIME:
        visit[OUT_SINCE] = ts
    if ts - visit[OUT_SINCE] >= exit_confirm_ms:
        visit[STATE] = _CLOSED
        return ENDED_BIT
    return 0


def moments_of(bits: int) -> list[Moment]:
    return [moment for bit, moment in _MOMENT_BITS if bits & bit]


@dataclass(slots=True)
class Visit:
    """One visit as an object: for a single visit's questions and for inspecting a tracker.
    The tracker itself keeps its visits as rows (see `step`)."""

    unit_id: str
    zone_id: str
    started_at: int  # epoch ms
    last_in: int  # last usable ping inside or near; a visit always ends here
    last_seen: int  # last usable ping of any kind that this visit judged
    state: VisitState = VisitState.OPEN
    out_since: int | None = None
    end_reason: EndReason | None = None
    target_reported: bool = False
    overstay_reported: bool = False

    @classmethod
    def open(cls, unit_id: str, zone_id: str, ts: int) -> Visit:
        return cls(unit_id, zone_id, ts, ts, ts)  # started_at, last_in, last_seen

    def row(self) -> list[int]:
        return [self.started_at, self.last_in, self.last_seen,
                NO_TIME if self.out_since is None else self.out_since, int(self.state),
                int(self.target_reported), int(self.overstay_reported)]  # fmt: skip

    @property
    def duration_ms(self) -> int:
        return self.last_in - self.started_at

    @property
    def is_open(self) -> bool:
        return self.state is not VisitState.CLOSED

    def observe(
        self, where: Where, ts: int, rules: ZoneRules, exit_confirm_ms: int
    ) -> Sequence[Moment]:
        """Judge one usable ping of this unit; return the moments it caused, in order."""
        if self.state is VisitState.CLOSED:
            raise IllegalTransition(f"visit {self.unit_id}/{self.zone_id} is closed")
        row = np.array(self.row(), dtype=np.int64)
        bits = step(row, int(where), ts, rules.target_ms, rules.max_visit_ms, exit_confirm_ms)
        _, self.last_in, self.last_seen, out_since, state, target, overstay = row.tolist()
        self.state, self.out_since = VisitState(state), None if out_since == NO_TIME else out_since
        self.target_reported, self.overstay_reported = bool(target), bool(overstay)
        if bits & ENDED_BIT:
            self.end_reason = EndReason.EXITED
        return moments_of(bits)

    def close(self, reason: EndReason) -> None:
        if self.state is VisitState.CLOSED:
            raise IllegalTransition(f"visit {self.unit_id}/{self.zone_id} is already closed")
        self.state = VisitState.CLOSED
        self.end_reason = reason
