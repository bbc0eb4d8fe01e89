"""The visit state machine for one unit in one zone.

In the style of h11: no I/O, every transition in `_TRANSITIONS`, and anything else raises
`IllegalTransition` instead of being guessed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

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


# Most observations cause nothing: one shared empty answer, not a new list each time.
_NOTHING: tuple[Moment, ...] = ()


@dataclass(slots=True)
class Visit:
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
        if ts <= self.last_seen:
            raise IllegalTransition(
                f"ping at {ts} is not after the visit's previous ping at {self.last_seen}"
            )
        state = self.state = _TRANSITIONS[(self.state, where)]
        self.last_seen = ts
        if state is VisitState.OPEN:
            self.last_in = ts  # the time in between stays credited: a short excursion is jitter
            self.out_since = None
            if self.target_reported and self.overstay_reported:
                return _NOTHING
            moments: list[Moment] = []
            duration = ts - self.started_at
            if not self.target_reported and duration >= rules.target_ms:
                self.target_reported = True
                moments.append(Moment.TARGET_MET)
            if not self.overstay_reported and duration > rules.max_visit_ms:
                self.overstay_reported = True
                moments.append(Moment.OVERSTAY)
            return moments
        if self.out_since is None:
            self.out_since = ts
        if ts - self.out_since >= exit_confirm_ms:
            self.close(EndReason.EXITED)
            return [Moment.ENDED]
        return _NOTHING

    def stay(self, ts: int, rules: ZoneRules) -> bool:
        """`observe(INSIDE or NEAR, ...)` for the most common ping of all, one that finds the
        unit in (or back in) the zone and causes no moment, without building an answer.
        Anything else (and any ping `observe` would refuse) changes nothing here and returns
        False: the caller then asks `observe`."""
        if self.state is VisitState.CLOSED or ts <= self.last_seen:
            return False
        duration = ts - self.started_at
        if (not self.target_reported and duration >= rules.target_ms) or (
            not self.overstay_reported and duration > rules.max_visit_ms
        ):
            return False
        self.state = VisitState.OPEN
        self.out_since = None
        self.last_in = self.last_seen = ts
        return True

    def away(self, ts: int, exit_confirm_ms: int) -> bool:
        """`observe(OUTSIDE, ...)` for a ping that does not confirm the exit: the visit's exit
        starts (or goes on) waiting for confirmation. Otherwise False, unchanged."""
        if self.state is VisitState.CLOSED or ts <= self.last_seen:
            return False
        out_since = ts if self.out_since is None else self.out_since
        if ts - out_since >= exit_confirm_ms:
            return False
        self.state = VisitState.EXIT_PENDING
        self.out_since = out_since
        self.last_seen = ts
        return True

    def close(self, reason: EndReason) -> None:
        if self.state is VisitState.CLOSED:
            raise IllegalTransition(f"visit {self.unit_id}/{self.zone_id} is already closed")
        self.state = VisitState.CLOSED
        self.end_reason = reason
