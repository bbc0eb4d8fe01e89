"""Fast reading of well-formed pings: msgspec decodes them and checks types and ranges,
then the unit id and the time are checked in plain Python, into columns.

Whatever it does not read goes the `Ping` model's way, so errors read as they always have.
Replay reads its lines with it, and the services their Kafka records; ingest takes every field
(`read_ping`) to write the normalised ping without the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

import msgspec

from schemas.ping import UNIT_ID_PATTERN
from schemas.timefmt import SUFFIX_MS, canonical_times, parse_ts

_Lat = Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
_Lon = Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
_NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
_Heading = Annotated[float, msgspec.Meta(ge=0.0, lt=360.0)]


class _WirePing(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The ping contract as msgspec checks it: types and ranges (JSON has no infinity or NaN,
    and msgspec refuses numbers past a float's range). `FastPings` checks the unit id and the
    time."""

    unit_id: str
    ts: str | int
    lat: _Lat
    lon: _Lon
    accuracy_m: _NonNegative | None = None
    speed_mps: _NonNegative | None = None
    heading_deg: _Heading | None = None
    source: str | None = None


_UNIT_ID = re.compile(UNIT_ID_PATTERN.removeprefix("^").removesuffix("$"))
_DECODE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError)  # ValueError: bad UTF-8
PingFields = tuple[str, int, float, float, float | None]  # unit_id, ts, lon, lat, accuracy_m
# Every field of the `Ping` model, in its order: unit_id, ts, lat, lon, accuracy_m, speed_mps,
# heading_deg, source (None: absent or null).
PingRecord = tuple[str, int, float, float, float | None, float | None, float | None, str | None]
# Unit ids seen valid are kept to skip the regex; a long-running reader (ingest) must not grow
# without bound on a stream of made-up ids.
_UNITS_MAX = 65_536


@dataclass(slots=True)
class PingColumns:
    """Pings read from a run of lines, a list per field, and the lines (positions in the run)
    that were not read: they go the model's way."""

    unit_id: list[str]
    ts: list[int]
    lon: list[float]
    lat: list[float]
    accuracy_m: list[float | None]
    unread: list[int]


class FastPings:
    """Reads lines holding one well-formed ping each several times faster than orjson +
    pydantic: msgspec decodes them and checks types and ranges, then the unit id and the time
    are checked in plain Python.

    What it does not read (bad JSON, an array, a value out of range, an unknown field...) goes
    the model's way, so its errors read as they always have.
    """

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(_WirePing).decode
        self._many = msgspec.json.Decoder(list[_WirePing]).decode
        self._units: set[str] = set()
        self._seconds: dict[str, int] = {}

    def read(self, line: bytes) -> PingFields | None:
        """The fields the `Ping` model would hold for this line, or None."""
        p = self._decoded(line)
        ts = None if p is None else self._ts(p.ts)
        if p is None or ts is None:
            return None
        return p.unit_id, ts, p.lon, p.lat, p.accuracy_m

    def read_ping(self, raw: bytes) -> PingRecord | None:
        """Every field the `Ping` model would hold for this message (one JSON object), or None.

        The values are the model's own: a JSON integer in a float field is a float (as strict
        pydantic makes it), and `ts` is epoch milliseconds."""
        p = self._decoded(raw)
        ts = None if p is None else self._ts(p.ts)
        if p is None or ts is None:
            return None
        return p.unit_id, ts, p.lat, p.lon, p.accuracy_m, p.speed_mps, p.heading_deg, p.source

    def _decoded(self, raw: bytes) -> _WirePing | None:
        """One message decoded and range-checked, with a valid unit id; else None."""
        try:
            p = self._one(raw)
        except _DECODE_ERRORS:
            return None
        if p.unit_id not in self._units and not self._new_unit(p.unit_id):
            return None
        if p.lat == 0.0 and p.lon == 0.0:  # null island: the model refuses it
            return None
        return p

    def read_lines(self, lines: list[bytes]) -> PingColumns:
        """`read` for a run of lines, as columns."""
        joined = b",".join(lines)
        seams = joined.count(b"}\n,{")
        if seams != len(lines) - 1:
            seams += joined.count(b"}\r\n,{")
        return self._read_joined(lines, joined, seams)

    def read_values(self, values: list[bytes]) -> PingColumns:
        """`read_lines` for messages without their newlines (Kafka record values), joined as
        lines without a copy of each to end it with one."""
        joined = b"\n,".join(values)
        if joined.count(b"\n") != len(values) - 1:  # a message of several lines: not a line
            return self._line_by_line(values)
        return self._read_joined(values, joined, joined.count(b"}\n,{"))

    def _read_joined(self, lines: list[bytes], joined: bytes, seams: int) -> PingColumns:
        # One call for the run: a JSON array of the lines, if that array's elements are the
        # lines. They are when every line starts with "{" and ends with "}" (and its newline)
        # and there are as many elements as lines: a value cannot run past the end of a line
        # inside a string (a raw newline is not allowed there), accepted pings hold no nested
        # objects, so a line's last "}" closes the object its first "{" opened.
        if (
            not lines
            or not lines[0].startswith(b"{")
            or not lines[-1].rstrip(b"\r\n").endswith(b"}")
            or seams != len(lines) - 1
        ):
            return self._line_by_line(lines)
        try:
            pings = self._many(b"[" + joined + b"]")
        except _DECODE_ERRORS:
            return self._line_by_line(lines)
        if len(pings) != len(lines):
            return self._line_by_line(lines)
        units = [p.unit_id for p in pings]
        if not self._units.issuperset(units):
            for unit_id in set(units) - self._units:
                if not self._new_unit(unit_id):
                    return self._line_by_line(lines)
        # The canonical form (as every service writes it), in one compiled pass; else one by one.
        ts = canonical_times([p.ts for p in pings]) or self._times(pings)
        if ts is None:
            return self._line_by_line(lines)
        lon = [p.lon for p in pings]
        lat = [p.lat for p in pings]
        if 0.0 in lat and any(y == 0.0 and x == 0.0 for x, y in zip(lon, lat, strict=True)):
            return self._line_by_line(lines)  # null island: the model refuses it
        return PingColumns(units, ts, lon, lat, [p.accuracy_m for p in pings], [])

    def _times(self, pings: list[_WirePing]) -> list[int] | None:
        """Each ping's time by `_ts`; None if one is not a time."""
        seconds = self._seconds
        ts: list[int] = []
        for p in pings:
            value = p.ts
            # The canonical form, its second seen before: a few dict lookups.
            if type(value) is str and len(value) == 24:
                millis = SUFFIX_MS.get(value[19:])
                if millis is not None:
                    second = seconds.get(value[:19])
                    if second is not None:
                        ts.append(second + millis)
                        continue
            t = self._ts(value)
            if t is None:
                return None
            ts.append(t)
        return ts

    def _line_by_line(self, lines: list[bytes]) -> PingColumns:
        out = PingColumns([], [], [], [], [], [])
        for k, line in enumerate(lines):
            ping = self.read(line)
            if ping is None:
                out.unread.append(k)
                continue
            out.unit_id.append(ping[0])
            out.ts.append(ping[1])
            out.lon.append(ping[2])
            out.lat.append(ping[3])
            out.accuracy_m.append(ping[4])
        return out

    def _new_unit(self, unit_id: str) -> bool:
        if not _UNIT_ID.fullmatch(unit_id):
            return False
        if len(self._units) >= _UNITS_MAX:
            self._units.clear()
        self._units.add(unit_id)
        return True

    def _ts(self, value: str | int) -> int | None:
        """`parse_ts`, with the second of the canonical form looked up in a dict of its own."""
        if (
            isinstance(value, str)
            and len(value) == 24
            and (millis := SUFFIX_MS.get(value[19:])) is not None
        ):
            second = self._seconds.get(value[:19])
            if second is None:
                try:
                    second = parse_ts(value[:19] + ".000Z")
                except ValueError:
                    return None
                if len(self._seconds) >= 65_536:
                    self._seconds.clear()
                self._seconds[value[:19]] = second
            return second + millis
        try:
            return parse_ts(value)
        except ValueError:
            return None


__all__ = ["FastPings", "PingColumns", "PingFields", "PingRecord"]
