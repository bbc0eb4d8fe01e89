"""The API's status book (pure): numbering, conflation, resume, unit presence, and the
nearest-zone search."""

from __future__ import annotations

from typing import Any

import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.core.nearby import Places, ZonePlace
from services.api.core.statusbook import StatusBook


def status(zone: str, t: int, kind: str = "active", units: dict[str, str] | None = None) -> Any:
    units = units or {}
    return {"zone_id": zone, "status": kind, "as_of": f"2026-11-22T10:00:{t:02d}.000Z",
            "units": [{"unit_id": u, "since": s} for u, s in sorted(units.items())]}  # fmt: skip


def test_numbering_redelivery_and_stale_statuses() -> None:
    book = StatusBook()
    assert book.apply(status("A", 1)) == 1
    assert book.apply(status("A", 1)) is None  # the same status again: a redelivery
    assert book.apply(status("A", 0, "due")) is None  # older than what is held
    assert book.apply(status("B", 2)) == 2
    assert book.apply(status("A", 3, "met")) == 3
    assert [s["zone_id"] for s in book.snapshot().statuses] == ["A", "B"]


def test_changes_since_conflates_to_the_latest_state_per_zone() -> None:
    book = StatusBook()
    book.apply(status("A", 1))
    seen = book.seq
    book.apply(status("B", 2))
    assert book.changes_since(seen) is not None
    got = book.changes_since(seen)
    assert got is not None and not got.conflated and [s["zone_id"] for s in got.statuses] == ["B"]
    book.apply(status("A", 3, "met"))
    book.apply(status("A", 4, "overstay"))
    got = book.changes_since(seen)
    assert got is not None and got.conflated and got.seq == book.seq
    assert [(s["zone_id"], s["status"]) for s in got.statuses] == [("B", "active"),
                                                                    ("A", "overstay")]  # fmt: skip
    current = book.changes_since(book.seq)
    assert current is not None and current.statuses == []


def test_resume_too_old_or_from_the_future_needs_a_snapshot() -> None:
    book = StatusBook(keep=3)
    for t in range(6):
        book.apply(status(f"Z{t}", t))
    assert book.changes_since(1) is None  # its changes are no longer kept
    assert book.changes_since(book.seq + 5) is None  # another replica's numbering
    kept = book.changes_since(3)
    assert kept is not None and [s["zone_id"] for s in kept.statuses] == ["Z3", "Z4", "Z5"]


def test_a_seq_resumes_only_in_the_numbering_it_came_from() -> None:
    """A restarted API (or another replica) numbers the same zones afresh: a seq from the old
    numbering says nothing about what the client holds, so it gets a snapshot."""
    old = StatusBook()
    for t in range(15):
        old.apply(status(f"Z{t % 8}", t, units={"u": f"t{t}"}))
    assert old.seq == 15
    client = {s["zone_id"]: s for s in old.snapshot().statuses}
    old.apply(status("Z3", 20, "met"))  # while the client was away, then the API restarted
    new = StatusBook()
    for t, zone_id in enumerate(sorted(old.zones) * 2):  # the replay, past the client's seq
        new.apply(old.zones[zone_id] | {"replayed": t})
    assert new.seq == 16 and old.epoch != new.epoch
    assert new.resume(old.epoch, 15) is None  # not new.changes_since(15): one zone of eight
    assert new.resume(None, 15) is None  # a bare seq: whose numbering is unknown
    assert client != new.zones
    assert old.resume(old.epoch, 15) == old.changes_since(15)
    again = new.resume(new.epoch, 10)
    assert again is not None and again.epoch == new.epoch and again.seq == 16
    assert new.snapshot().epoch == new.epoch


def test_epochs_are_random_and_injectable() -> None:
    epochs = {StatusBook().epoch for _ in range(50)}
    assert len(epochs) == 50
    assert all(len(e) == 8 and e.isascii() and e.isalnum() for e in epochs)
    assert StatusBook(epoch="feedf00d").epoch == "feedf00d"


def test_filters_and_tombstones() -> None:
    book = StatusBook()
    book.apply(status("A", 1, "due"))
    book.apply(status("B", 1, "active"))
    only_due = book.snapshot(lambda z, s: s["status"] == "due")
    assert [s["zone_id"] for s in only_due.statuses] == ["A"]
    seen = book.seq
    assert book.remove("A") == seen + 1
    assert book.remove("A") is None
    got = book.changes_since(seen)
    assert got is not None and got.statuses == [{"zone_id": "A", "deleted": True}]


def test_units_follow_presence() -> None:
    book = StatusBook()
    book.apply(status("A", 1, units={"u1": "t1", "u2": "t1"}))
    book.apply(status("B", 2, units={"u1": "t2"}))
    assert book.unit_zones == {"u1": {"A": "t1", "B": "t2"}, "u2": {"A": "t1"}}
    book.apply(status("A", 3, units={"u2": "t1"}))
    assert book.unit_zones == {"u1": {"B": "t2"}, "u2": {"A": "t1"}}
    book.remove("B")
    assert book.unit_zones == {"u2": {"A": "t1"}}


OPS = st.lists(st.tuples(st.sampled_from("ABCDE"), st.sampled_from(["due", "active", "met"])),
               max_size=60)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    OPS,
    st.integers(0, 60),
    st.integers(2, 80),
)
def test_a_client_that_applies_changes_since_its_seq_ends_equal(
    ops: list[tuple[str, str]], cut: int, keep: int
) -> None:
    """Whatever it missed, a resumed client ends with exactly the book's state (or is told
    to take a snapshot)."""
    book = StatusBook(keep=keep)
    for i, (zone, kind) in enumerate(ops[:cut]):
        book.apply(status(zone, i % 60, kind) | {"n": i})
    client = {s["zone_id"]: s for s in book.snapshot().statuses}
    seq = book.seq
    for i, (zone, kind) in enumerate(ops[cut:], start=cut):
        book.apply(status(zone, i % 60, kind) | {"n": i})
    got = book.changes_since(seq)
    if got is None:
        assert seq + 1 < book.seq - keep + 1
        return
    for s in got.statuses:
        client[s["zone_id"]] = s
    assert client == book.zones and got.seq == book.seq


def test_nearest_zones_in_metres() -> None:
    # Three 100 m squares east of the origin at 40N; distances to their west edges.
    lat0, lon0 = 40.0, -74.0
    dlon = 1 / (111_320.0 * 0.766044)  # one metre of longitude at 40N
    dlat = 1 / 110_574.0

    def square(east_m: float) -> Any:
        w = lon0 + east_m * dlon
        return shapely.box(w, lat0 - 50 * dlat, w + 100 * dlon, lat0 + 50 * dlat)

    places = Places([ZonePlace("far", square(900)), ZonePlace("near", square(100)),
                     ZonePlace("mid", square(400))])  # fmt: skip
    got = places.nearest(lon0, lat0, 2)
    assert [z for z, _ in got] == ["near", "mid"]
    assert abs(got[0][1] - 100) < 1 and abs(got[1][1] - 400) < 2
    assert [z for z, _ in places.nearest(lon0, lat0, 5, {"far"})] == ["far"]
    inside = places.nearest(lon0 + 150 * dlon, lat0, 1)
    assert inside == [("near", 0.0)]
    assert Places([]).nearest(lon0, lat0, 3) == []
