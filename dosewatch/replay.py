"""`dosewatch replay`: recompute dosage from archived pings through the live services' core."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import ValidationError

from dosewatch.settings import ReplaySettings
from schemas.fastping import FastPings, PingColumns
from schemas.ping import Ping, PingError, ping_errors, validate_ping
from schemas.zone import parse_zone_collection
from services.dosage.core.board import ZoneBoard
from services.dosage.core.events import (
    period_row,
    status_cloudevent,
    visit_lines,
)
from services.dosage.core.params import DosageParams
from services.dosage.core.periods import zone_periods
from services.dosage.core.tracker import (
    EventRows,
    Fix,
    VisitEvent,
    VisitEventKind,
    VisitTracker,
)
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
    # Each ended visit with its visits.jsonl line, keyed for sorting (the arrival number keeps
    # equal keys in arrival order, as a stable sort would, and the events are never compared).
    ended: list[tuple[int, str, str, int, VisitEvent, bytes]] = []
    with (
        source,
        (out_dir / "events.jsonl").open("wb") as events_out,
        (out_dir / "rejected.jsonl").open("wb") as rejected_out,
    ):
        uri = settings.source
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        visit_ended = VisitEventKind.ENDED

        def emit(batch: EventRows) -> None:
            lines: list[bytes] = []
            # Each event's line, and an ended visit's visits.jsonl row (the data it carries).
            for e, (line, row) in zip(batch.events(), visit_lines(batch, uri), strict=True):
                lines.append(line)
                if e.kind is visit_ended:
                    assert row is not None
                    ended.append((e.started_at, e.unit_id, e.zone_id, len(ended), e, row))
                # The board follows the stream clock, as the live dosage service follows its
                # partition clock, so time-driven changes come out when they happen: apply moves
                # it to the event's clock (never behind its time) first.
                for change in board.apply(e):
                    lines.append(dumps(status_cloudevent(change, uri), option=newline))
            events_out.writelines(lines)
            summary.events += len(lines)

        # Pings waiting for a full batch, as columns (unit_id, ts, lon, lat, accuracy_m).
        columns = PingColumns([], [], [], [], [], [])
        units, times, lons, lats = columns.unit_id, columns.ts, columns.lon, columns.lat
        accuracies = columns.accuracy_m
        size = settings.batch_size

        def flush(everything: bool = False) -> None:
            """Batches of batch_size pings, as they filled up in order; the rest at the end."""
            while len(units) >= size or (everything and units):
                emit(
                    tracker.process_rows(
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
        emit(tracker.finish_rows())

    ended.sort()
    qualified: dict[str, list[tuple[int, int]]] = {}
    with (out_dir / "visits.jsonl").open("wb") as visits_out:
        visits_out.writelines([row for *_, row in ended])
    for *_, e, _row in ended:
        summary.end_reasons[str(e.end_reason)] = summary.end_reasons.get(str(e.end_reason), 0) + 1
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
