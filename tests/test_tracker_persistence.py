"""A tracker saved and restored mid-stream carries on exactly as one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from dosewatch.replay import decode_lines, load_zones
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import Fix, VisitEvent, VisitTracker
from services.geofence.core.index import ZoneIndex

SAMPLE = Path(__file__).parent / "data" / "evening-shift"


@pytest.fixture(scope="module")
def sample() -> tuple[ZoneIndex, list[Fix]]:
    index = ZoneIndex(load_zones(SAMPLE / "zones.geojson"), DosageParams())
    lines = enumerate((SAMPLE / "pings.jsonl").read_bytes().splitlines(), start=1)
    fixes = [fix for fix, _ in decode_lines(lines) if fix is not None]
    return index, fixes


def run(tracker: VisitTracker, fixes: list[Fix]) -> list[VisitEvent]:
    return tracker.process(fixes)


@pytest.mark.parametrize("cut", [1, 500, 3333, 7000, 12000, 14000])
def test_save_restore_is_invisible(sample: tuple[ZoneIndex, list[Fix]], cut: int) -> None:
    index, fixes = sample
    params = DosageParams()
    straight = VisitTracker(index, params)
    expected = run(straight, fixes) + straight.finish()

    first = VisitTracker(index, params)
    events = run(first, fixes[:cut])
    # Round-trip through JSON, as the database stores it.
    saved = {u: json.loads(orjson.dumps(first.export_unit(u))) for u in sorted(first.dirty)}
    meta = json.loads(orjson.dumps(first.export_meta()))

    second = VisitTracker(index, params)
    second.restore_meta(meta)
    for unit_id, data in saved.items():
        second.restore_unit(unit_id, data)
    events += run(second, fixes[cut:]) + second.finish()
    assert events == expected


def _as_dict(flat: list[Any]) -> dict[str, Any]:
    """The form state was saved in before the flat list."""
    return {"last_usable": flat[0], "seen": flat[1:5], "open": flat[5:]}


def test_state_saved_in_the_old_dict_form_restores_the_same(
    sample: tuple[ZoneIndex, list[Fix]],
) -> None:
    index, fixes = sample
    params = DosageParams()
    first = VisitTracker(index, params)
    run(first, fixes[:7000])
    saved = {u: first.export_unit(u) for u in sorted(first.dirty)}
    assert any(len(flat) > 5 for flat in saved.values())  # some units have open visits
    flat, old = VisitTracker(index, params), VisitTracker(index, params)
    for unit_id, data in saved.items():
        flat.restore_unit(unit_id, data)
        old.restore_unit(unit_id, _as_dict(data))
    assert flat.units == old.units
    assert run(flat, fixes[7000:]) + flat.finish() == run(old, fixes[7000:]) + old.finish()


def test_dirty_tracks_touched_units(sample: tuple[ZoneIndex, list[Fix]]) -> None:
    index, fixes = sample
    tracker = VisitTracker(index, DosageParams())
    tracker.process(fixes[:50])
    touched = {f.unit_id for f in fixes[:50]}
    assert tracker.dirty == touched
    tracker.dirty.clear()
    tracker.process(fixes[50:51])
    assert tracker.dirty == {fixes[50].unit_id}
