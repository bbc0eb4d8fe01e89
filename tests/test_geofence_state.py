"""The geofence service's partition state, saved as it saves it (a table of the changed units
per save, encoded by the state store) and restored from the saved changes, carries on exactly
as a service that never stopped; state saved a row per unit (before tables) still restores.

The service runs on fetches of records without Kafka or a database: `process`,
`dirty_state` and `restore_partition` are its own, and `statestore.apply_change` is the
store's own reading of its saved changes (the database round trip is `test_state_save`'s)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from services.common import statestore
from services.common.statestore import PartitionStateStore, apply_change
from services.dosage.core.params import DosageParams
from services.geofence.core.index import ZoneIndex
from services.geofence.service import META, TABLE, GeofenceService, GeofenceSettings

SAMPLE = Path(__file__).parent / "data" / "evening-shift"
FETCH = 700


@pytest.fixture(scope="module")
def records() -> list[ConsumerRecord]:
    lines = (SAMPLE / "pings.jsonl").read_bytes().splitlines()
    return [
        ConsumerRecord("pings", 0, k, 0, 0, None, line, None, 0, len(line), ())
        for k, line in enumerate(lines)
    ]


@pytest.fixture(scope="module")
def index() -> ZoneIndex:
    from dosewatch.replay import load_zones

    return ZoneIndex(load_zones(SAMPLE / "zones.geojson"), DosageParams())


def service(index: ZoneIndex, rows: dict[str, Any]) -> GeofenceService:
    s = GeofenceService(GeofenceSettings(wall_clock=False))
    s.index = index
    s.restore_partition(0, rows)
    return s


def feed(s: GeofenceService, records: list[ConsumerRecord]) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for start in range(0, len(records), FETCH):
        out += s.process(0, records[start : start + FETCH])[0]
    return out


def saved(s: GeofenceService, store: PartitionStateStore, docs: list[tuple[bool, bytes]]) -> None:
    change = store.encode(0, s.dirty_state(0), partial(s.full_state, 0))
    if change is not None:
        docs.append(change[1:])


def read_back(docs: list[tuple[bool, bytes]]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for snapshot, doc in docs:
        apply_change(state, snapshot, doc)
    return state


@pytest.mark.parametrize("snapshot_bytes", [1 << 20, 2_000])
@pytest.mark.parametrize("cut", [1, 5, 13])
def test_a_restored_partition_carries_on_as_if_it_never_stopped(
    index: ZoneIndex,
    records: list[ConsumerRecord],
    cut: int,
    snapshot_bytes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(statestore, "SNAPSHOT_MIN_BYTES", snapshot_bytes)
    straight = service(index, {})
    expected = feed(straight, records)

    first, store = service(index, {}), PartitionStateStore("geofence", "pings")
    docs: list[tuple[bool, bytes]] = []
    events: list[tuple[bytes, bytes]] = []
    for k in range(cut):  # a save after each fetch, as a commit interval would
        events += feed(first, records[k * FETCH : (k + 1) * FETCH])
        saved(first, store, docs)
    rows = read_back(docs)
    tables = [k for k in rows if k.startswith(TABLE)]
    assert tables and not set(rows) - {META, *tables}  # units are saved as tables only
    if snapshot_bytes < 1 << 20 and cut > 1:
        assert any(snapshot for snapshot, _ in docs)
    second = service(index, rows)
    before, after = first.trackers[0], second.trackers[0]
    assert after.export_units(after.unit_ids) == before.export_units(before.unit_ids)
    events += feed(second, records[cut * FETCH :])
    assert events == expected
    # Numbering carries on after the tables read back.
    newest = max(int(t.removeprefix(TABLE)) for t in tables)
    assert second.dirty_state(0).keys() == {META, f"{TABLE}{newest + 1}"}


def test_the_newest_table_holding_a_unit_is_its_state(
    index: ZoneIndex, records: list[ConsumerRecord]
) -> None:
    s = service(index, {})
    feed(s, records[:2000])
    tracker = s.trackers[0]
    unit = sorted(tracker.unit_ids)[0]
    older = tracker.export_table([unit])
    feed(s, records[2000:9000])
    newer = tracker.export_table([unit])
    as_older = service(index, {f"{TABLE}0": older}).trackers[0].export_unit(unit)
    assert tracker.export_unit(unit) != as_older
    # Ordered by number, not as text ("10" sorts before "9"), whatever the keys' order; a
    # unit's row from before tables is older than any table.
    legacy = {unit: as_older}
    rows = {f"{TABLE}10": newer, **legacy, f"{TABLE}9": older, META: tracker.export_meta()}
    restored = service(index, rows).trackers[0]
    assert restored.export_unit(unit) == tracker.export_unit(unit)
    assert restored.clock == tracker.clock


def test_state_saved_a_row_per_unit_still_restores(
    index: ZoneIndex, records: list[ConsumerRecord]
) -> None:
    s = service(index, {})
    feed(s, records[:5000])
    tracker = s.trackers[0]
    rows: dict[str, Any] = tracker.export_units(tracker.unit_ids)
    rows[META] = tracker.export_meta()
    restored = service(index, rows)
    assert feed(restored, records[5000:]) == feed(s, records[5000:])
