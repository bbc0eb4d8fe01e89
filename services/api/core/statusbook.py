"""Latest status per zone, numbered changes, and per-unit presence. Pure: no I/O.

Every applied status gets the next sequence number. A client that has seen up to `seq` gets
`changes_since(seq)`: the latest status of each zone changed since, which is conflation by
construction (a slow client skips intermediate states of a zone, never the latest one), and
is told whether anything was skipped. Only the numbers of recent changes are kept, so memory
is bounded by zones + `keep`, whatever the clients do.

Numbers mean something only within one book: a restarted process, or another replica, numbers
the same statuses afresh (a replay numbers each once, whatever came before). So each book has
a random `epoch`, sent with every seq, and a client resumes with both (`resume`); a seq from
another epoch, or without one, gets a snapshot."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Changes:
    statuses: list[dict[str, Any]]
    seq: int  # the newest seq these bring the client to
    conflated: bool  # some zone changed more than once: only its latest state is here
    epoch: str  # the numbering seq belongs to: the book's


def new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass(slots=True)
class StatusBook:
    keep: int = 50_000
    seq: int = 0
    epoch: str = field(default_factory=new_epoch)  # this book's numbering (tests inject one)
    zones: dict[str, dict[str, Any]] = field(default_factory=dict)
    zone_seq: dict[str, int] = field(default_factory=dict)
    # unit -> zone -> arrival (the status's own "since" text)
    unit_zones: dict[str, dict[str, str]] = field(default_factory=dict)
    _log: deque[tuple[int, str]] = field(default_factory=deque)

    def apply(self, status: dict[str, Any]) -> int | None:
        """A status from dosage.zone-status. Returns its seq, or None if it changes nothing
        (a redelivery, or one older than what is held)."""
        zone_id = status["zone_id"]
        held = self.zones.get(zone_id)
        if held is not None and (held == status or held["as_of"] > status["as_of"]):
            return None
        self.seq += 1
        self.zones[zone_id] = status
        self.zone_seq[zone_id] = self.seq
        self._log.append((self.seq, zone_id))
        if len(self._log) > self.keep:
            self._log.popleft()
        self._place_units(zone_id, status, held)
        return self.seq

    def remove(self, zone_id: str) -> int | None:
        """A deleted zone: its status goes, and clients hear of it as a tombstone."""
        held = self.zones.pop(zone_id, None)
        if held is None:
            return None
        self._place_units(zone_id, {"units": []}, held)
        self.seq += 1
        self.zone_seq[zone_id] = self.seq
        self._log.append((self.seq, zone_id))
        if len(self._log) > self.keep:
            self._log.popleft()
        return self.seq

    def _place_units(
        self, zone_id: str, status: dict[str, Any], held: dict[str, Any] | None
    ) -> None:
        now = {u["unit_id"]: u["since"] for u in status.get("units", [])}
        before = {u["unit_id"] for u in held.get("units", [])} if held else set()
        for unit in before - now.keys():
            zones = self.unit_zones.get(unit)
            if zones is not None:
                zones.pop(zone_id, None)
                if not zones:
                    del self.unit_zones[unit]
        for unit, since in now.items():
            self.unit_zones.setdefault(unit, {})[zone_id] = since

    def snapshot(self, keep: Callable[[str, dict[str, Any]], bool] | None = None) -> Changes:
        statuses = [s for z, s in sorted(self.zones.items()) if keep is None or keep(z, s)]
        return Changes(statuses, self.seq, False, self.epoch)

    def resume(
        self, epoch: str | None, seq: int, keep: Callable[[str, dict[str, Any]], bool] | None = None
    ) -> Changes | None:
        """changes_since for a client that holds (epoch, seq): None (it needs a snapshot) when
        that seq is another book's numbering, or of a numbering it did not say."""
        if epoch != self.epoch:
            return None
        return self.changes_since(seq, keep)

    def changes_since(
        self, seq: int, keep: Callable[[str, dict[str, Any]], bool] | None = None
    ) -> Changes | None:
        """What a client at `seq` has not seen; None if that is older than what is kept
        (it needs a fresh snapshot). Deleted zones come as {"zone_id", "deleted": true}."""
        if seq > self.seq:
            return None  # from another numbering (see resume, which checks that): start over
        if seq == self.seq:
            return Changes([], seq, False, self.epoch)
        oldest = self._log[0][0] if self._log else self.seq + 1
        if seq + 1 < oldest:
            return None
        changed = {zid for s, zid in _after(self._log, seq)}
        conflated = sum(1 for _ in _after(self._log, seq)) > len(changed)
        out: list[dict[str, Any]] = []
        for zone_id in sorted(changed, key=self.zone_seq.__getitem__):
            status = self.zones.get(zone_id)
            if status is None:
                out.append({"zone_id": zone_id, "deleted": True})
            elif keep is None or keep(zone_id, status):
                out.append(status)
        return Changes(out, self.seq, conflated, self.epoch)


def _after(log: deque[tuple[int, str]], seq: int) -> Iterable[tuple[int, str]]:
    # Newest first, stopping at seq: a client that is nearly current costs little.
    for item in reversed(log):
        if item[0] <= seq:
            return
        yield item
