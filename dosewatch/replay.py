"""`dosewatch replay`: recompute dosage from archived pings through the live services' core."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import msgspec
import orjson
from pydantic import ValidationError

from dosewatch.settings import ReplaySettings
from schemas.ping import UNIT_ID_PATTERN, Ping, PingError, ping_errors, validate_ping
from schemas.timefmt import parse_ts
from schemas.zone import parse_zone_collection
from services.dosage.core.board import ZoneBoard
from services.dosage.core.events import (
    period_row,
    status_cloudevent,
    visit_cloudevent,
    visit_row,
)
from services.dosage.core.params import DosageParams
from services.dosage.core.periods import zone_periods
from services.dosage.core.tracker import Fix, VisitEvent, VisitEventKind, VisitTracker
from services.geofence.core.index import ZoneIndex
from services.geofence.core.zone import ZoneSpec


class ReplayError(Exception):
    """Bad arguments or unreadable input: reported to the user, exit code 2."""


@dataclass(slots=True)
class Rejected:
    line: int
    errors: list[PingError]
    raw: str
    index: int | None = None  # position inside a JSON array line

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line}
        if self.index is not None:
            out["index"] = self.index
        out["errors"] = [e.model_dump() for e in self.errors]
        out["raw"] = self.raw
        return out


@dataclass(slots=True)
class ReplaySummary:
    lines: int = 0
    pings: int = 0
    rejected: int = 0
    usable: int = 0
    low_accuracy: int = 0
    duplicate: int = 0
    late: int = 0
    zones: int = 0
    visits: int = 0
    qualified: int = 0
    target_met: int = 0
    overstay: int = 0
    periods: int = 0
    events: int = 0
    seconds: float = 0.0
    end_reasons: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        rate = self.pings / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.end_reasons.items())) or "none"
        return (
            f"replayed {self.pings} pings from {self.lines} lines against {self.zones} zones "
            f"in {self.seconds:.2f} s ({rate:,.0f} pings/s)\n"
            f"  rejected {self.rejected}; ignored: low accuracy {self.low_accuracy}, "
            f"duplicate {self.duplicate}, late {self.late}; usable {self.usable}\n"
            f"  visits {self.visits} (qualified {self.qualified}, target met {self.target_met}, "
            f"overstay {self.overstay}); ended by: {reasons}\n"
            f"  zone periods {self.periods}; events {self.events}"
        )


def load_zones(path: Path) -> list[ZoneSpec]:
    try:
        doc = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ReplayError(f"cannot read zones file {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ReplayError(f"zones file {path} is not valid JSON: {exc}") from None
    features, errors = parse_zone_collection(doc)
    if errors:
        lines = [
            f"  feature {e.index}" + (f" ({e.zone_id})" if e.zone_id else "") + f": {e.reason}"
            for e in errors
        ]
        raise ReplayError(f"zones file {path} has invalid zones:\n" + "\n".join(lines))
    return [
        ZoneSpec(
            zone_id=f.zone_id,
            geometry=f.shape(),
            name=f.properties.name,
            target_s=f.properties.target_s,
            min_visit_s=f.properties.min_visit_s,
            max_visit_s=f.properties.max_visit_s,
            properties=f.properties.model_dump(exclude_none=True),
        )
        for f in features
    ]


def decode_lines(
    lines: Iterator[tuple[int, bytes]],
) -> Iterator[tuple[Fix | None, Rejected | None]]:
    """Each line holds one ping object or an array of them; blank lines carry nothing."""
    fast = FastPings()
    for lineno, line in lines:
        ping = fast.read(line)
        if ping is not None:
            yield Fix(*ping), None
        else:
            yield from _decode_slowly(lineno, line)


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
# The end of a canonical time, ".123Z", and its milliseconds (ASCII digits only).
_MILLIS = {f".{ms:03d}Z": ms for ms in range(1000)}
PingFields = tuple[str, int, float, float, float | None]  # unit_id, ts, lon, lat, accuracy_m


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
        try:
            p = self._one(line)
        except _DECODE_ERRORS:
            return None
        if p.unit_id not in self._units and not self._new_unit(p.unit_id):
            return None
        ts = self._ts(p.ts)
        if ts is None:
            return None
        return p.unit_id, ts, p.lon, p.lat, p.accuracy_m

    def read_lines(self, lines: list[bytes]) -> PingColumns:
        """`read` for a run of lines, as columns."""
        # One call for the run: a JSON array of the lines, if that array's elements are the
        # lines. They are when every line starts with "{" and ends with "}" (and its newline)
        # and there are as many elements as lines: a value cannot run past the end of a line
        # inside a string (a raw newline is not allowed there), accepted pings hold no nested
        # objects, so a line's last "}" closes the object its first "{" opened.
        joined = b",".join(lines)
        if (
            not lines
            or not lines[0].startswith(b"{")
            or not lines[-1].rstrip(b"\r\n").endswith(b"}")
            or joined.count(b"}\n,{") + joined.count(b"}\r\n,{") != len(lines) - 1
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
        seconds = self._seconds
        ts: list[int] = []
        unread: list[int] = []
        for k, p in enumerate(pings):
            value = p.ts
            # The canonical form (as every service writes it), its second seen before: the
            # common case, in a few dict lookups. Anything else: `_ts`.
            if type(value) is str and len(value) == 24:
                millis = _MILLIS.get(value[19:])
                if millis is not None:
                    second = seconds.get(value[:19])
                    if second is not None:
                        ts.append(second + millis)
                        continue
            t = self._ts(value)
            if t is None:
                unread.append(k)
            else:
                ts.append(t)
        if unread:
            return self._line_by_line(lines)
        return PingColumns(
            units,
            ts,
            [p.lon for p in pings],
            [p.lat for p in pings],
            [p.accuracy_m for p in pings],
            unread,
        )

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
        self._units.add(unit_id)
        return True

    def _ts(self, value: str | int) -> int | None:
        """`parse_ts`, with the second of the canonical form looked up in a dict of its own."""
        millis = _MILLIS.get(value[19:]) if isinstance(value, str) and len(value) == 24 else None
        if isinstance(value, str) and millis is not None:
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


def _decode_slowly(lineno: int, line: bytes) -> Iterator[tuple[Fix | None, Rejected | None]]:
    """orjson and the pydantic model: the errors every rejected line is reported with."""
    if not line.strip():
        return
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        err = PingError(field="(line)", reason=f"invalid JSON: {exc}")
        yield None, Rejected(lineno, [err], _text(line))
        return
    items = value if isinstance(value, list) else [value]
    for pos, item in enumerate(items):
        index = pos if isinstance(value, list) else None
        fix = _to_fix(item)
        if isinstance(fix, Fix):
            yield fix, None
        else:
            raw = _text(line) if index is None else orjson.dumps(item).decode()
            yield None, Rejected(lineno, fix, raw, index)


def _to_fix(item: Any) -> Fix | list[PingError]:
    if isinstance(item, dict):
        try:
            p = Ping.model_validate(item)
        except ValidationError as exc:
            return ping_errors(exc)
        return Fix(p.unit_id, p.ts, p.lon, p.lat, p.accuracy_m)
    result = validate_ping(item)
    assert not isinstance(result, Ping)
    return result


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r\n")


def run_replay(
    zones_path: Path, pings_path: Path, out_dir: Path, settings: ReplaySettings
) -> ReplaySummary:
    started = time.perf_counter()
    zones = load_zones(zones_path)
    params: DosageParams = settings.dosage
    index = ZoneIndex(zones, params)
    calendar = settings.calendar()
    tracker = VisitTracker(index, params)
    board = ZoneBoard(
        {zid: index.rules[i] for i, zid in enumerate(index.zone_ids)}, params, calendar
    )
    if out_dir.exists() and not out_dir.is_dir():
        raise ReplayError(f"--out {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        source = pings_path.open("rb")
    except OSError as exc:
        raise ReplayError(f"cannot open {exc.filename}: {exc.strerror}") from None

    summary = ReplaySummary(zones=len(zones))
    ended: list[VisitEvent] = []
    with (
        source,
        (out_dir / "events.jsonl").open("wb") as events_out,
        (out_dir / "rejected.jsonl").open("wb") as rejected_out,
    ):

        def emit(events: list[VisitEvent]) -> None:
            for e in events:
                _write(events_out, visit_cloudevent(e, settings.source))
                summary.events += 1
                if e.kind is VisitEventKind.ENDED:
                    ended.append(e)
                # The board follows the stream clock, as the live dosage service follows its
                # partition clock, so time-driven changes come out when they happen: apply moves
                # it to the event's clock (never behind its time) first.
                for change in board.apply(e):
                    _write(events_out, status_cloudevent(change, settings.source))
                    summary.events += 1

        # Pings waiting for a full batch, as columns (unit_id, ts, lon, lat, accuracy_m).
        columns = PingColumns([], [], [], [], [], [])
        units, times, lons, lats = columns.unit_id, columns.ts, columns.lon, columns.lat
        accuracies = columns.accuracy_m
        size = settings.batch_size

        def flush(everything: bool = False) -> None:
            """Batches of batch_size pings, as they filled up in order; the rest at the end."""
            while len(units) >= size or (everything and units):
                emit(
                    tracker.process_columns(
                        units[:size], times[:size], lons[:size], lats[:size], accuracies[:size]
                    )
                )
                for column in (units, times, lons, lats, accuracies):
                    del column[:size]

        def add(read: PingColumns, start: int, stop: int) -> None:
            units.extend(read.unit_id[start:stop])
            times.extend(read.ts[start:stop])
            lons.extend(read.lon[start:stop])
            lats.extend(read.lat[start:stop])
            accuracies.extend(read.accuracy_m[start:stop])

        fast = FastPings()
        lineno = 0
        try:
            while lines := source.readlines(1 << 22):
                read = fast.read_lines(lines)
                done = 0  # pings of `read` added so far
                for j, k in enumerate(read.unread):
                    # The pings read from the lines before line k (all but j of them), then
                    # whatever the model makes of line k.
                    add(read, done, k - j)
                    done = k - j
                    for fix, rejected in _decode_slowly(lineno + k + 1, lines[k]):
                        if fix is not None:
                            units.append(fix.unit_id)
                            times.append(fix.ts)
                            lons.append(fix.lon)
                            lats.append(fix.lat)
                            accuracies.append(fix.accuracy_m)
                        elif rejected is not None:
                            _write(rejected_out, rejected.row())
                            summary.rejected += 1
                add(read, done, len(read.unit_id))
                lineno += len(lines)
                flush()
        except OSError as exc:
            raise ReplayError(f"cannot read {pings_path}: {exc.strerror or exc}") from None
        summary.lines = lineno
        flush(everything=True)
        emit(tracker.finish())

    ended.sort(key=lambda e: (e.started_at, e.unit_id, e.zone_id))
    qualified: dict[str, list[tuple[int, int]]] = {}
    with (out_dir / "visits.jsonl").open("wb") as visits_out:
        for e in ended:
            _write(visits_out, visit_row(e))
            summary.end_reasons[str(e.end_reason)] = (
                summary.end_reasons.get(str(e.end_reason), 0) + 1
            )
            summary.qualified += e.qualified
            summary.target_met += e.target_met
            summary.overstay += e.overstay
            if e.qualified:
                qualified.setdefault(e.zone_id, []).append((e.started_at, e.last_in))
    with (out_dir / "zone_periods.jsonl").open("wb") as periods_out:
        for zone_id in sorted(qualified):
            target = index.rules[index.position[zone_id]].target_ms
            for period in zone_periods(zone_id, qualified[zone_id], target, calendar):
                _write(periods_out, period_row(period))
                summary.periods += 1

    stats = tracker.stats
    summary.pings = stats.valid + summary.rejected
    summary.usable, summary.low_accuracy = stats.usable, stats.low_accuracy
    summary.duplicate, summary.late = stats.duplicate, stats.late
    summary.visits = len(ended)
    summary.seconds = time.perf_counter() - started
    return summary


def _write(stream: IO[bytes], row: dict[str, Any]) -> None:
    stream.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
