"""`visit_records` and `visit_lines` write, from event rows, the bytes orjson makes of
`visit_cloudevent`'s dicts: the definition stays the dict, the hot path skips it."""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.timefmt import format_ts
from services.dosage.core import events, eventtext
from services.dosage.core.events import visit_cloudevent, visit_lines, visit_records
from services.dosage.core.params import ZoneRules
from services.dosage.core.tracker import END_REASONS, EVENT_KINDS, EventRows

T0 = 1_779_000_000_000  # 2026-05-17
MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999  # years 1 and 9999
# Ids as drawn: what a JSON string must escape, and more than ASCII.
IDS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
RULES = st.builds(
    ZoneRules,
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.integers(0, 10**9),
)


@st.composite
def batches(draw: st.DrawFn) -> EventRows:
    unit_ids = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    zone_ids = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    rules = draw(st.lists(RULES, min_size=len(zone_ids), max_size=len(zone_ids)))
    # Visits of minutes, and any span two dates can hold.
    span = st.one_of(st.integers(0, 10**7), st.integers(0, 2 * 10**14))
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(EVENT_KINDS) - 1),
                st.integers(-(10**10), 10**10),
                st.integers(0, len(unit_ids) - 1),
                st.integers(0, len(zone_ids) - 1),
                st.integers(0, 10**10),
                span,
                st.integers(0, len(END_REASONS) - 1),
                st.integers(0, 10**10),
            ),
            max_size=6,
        )
    )
    table = np.array(
        [(k, T0 + at, u, z, T0 + s, T0 + s + d, r, T0 + c) for k, at, u, z, s, d, r, c in rows],
        dtype=np.int64,
    ).reshape(-1, 8)
    return EventRows(table, unit_ids, zone_ids, rules)


@settings(max_examples=300, deadline=None)
@given(batches(), IDS)
def test_records_are_the_dicts_bytes(batch: EventRows, source: str) -> None:
    expected = [
        (e.zone_id.encode(), orjson.dumps(visit_cloudevent(e, source))) for e in batch.events()
    ]
    assert visit_records(batch, source) == expected


@settings(max_examples=100, deadline=None)
@given(batches())
def test_lines_are_the_replay_lines(batch: EventRows) -> None:
    newline = orjson.OPT_APPEND_NEWLINE
    expected = []
    for e in batch.events():
        doc = visit_cloudevent(e, "urn:test")
        data = orjson.dumps(doc["data"], option=newline) if e.kind == "ended" else None
        expected.append((orjson.dumps(doc, option=newline), data))
    assert visit_lines(batch, "urn:test") == expected


def _seconds_text(ms: int) -> bytes:
    out = np.empty(32, dtype=np.uint8)
    return out[: eventtext._seconds(ms, out, 0)].tobytes()


def test_durations_are_orjson_floats_to_a_millisecond() -> None:
    whole_range = np.arange(-3_000, 3_000_000)
    rng = np.random.default_rng(7)
    sample = np.concatenate([whole_range, rng.integers(-(10**15), 10**15, 300_000)]).tolist()
    for ms in sample:
        assert _seconds_text(ms) == orjson.dumps(ms / 1000.0), ms


@given(st.text())
def test_ids_hash_as_hashlib_sha256(text: str) -> None:
    expected = hashlib.sha256(text.encode()).hexdigest()[:32]
    assert events._digest(text) == expected


def test_the_compiled_hash_is_sha256_across_block_edges() -> None:
    # Lengths around SHA-256's 55/56/64-byte padding edges and several blocks.
    rng = np.random.default_rng(11)
    w = np.empty(64, dtype=np.uint32)
    for length in [*range(0, 200), 447, 448, 511, 512, 1000]:
        message = np.zeros(length + 72, dtype=np.uint8)
        message[:length] = rng.integers(0, 256, length)
        out = np.empty(32, dtype=np.uint8)
        assert eventtext.sha256_hex(message, length, w, out, 0) == 32
        expected = hashlib.sha256(message[:length].tobytes()).hexdigest()[:32]
        assert out.tobytes().decode() == expected, length


@settings(deadline=None)  # the first example compiles _time
@given(st.integers(MIN_MS, MAX_MS))
def test_times_are_format_ts(ms: int) -> None:
    out = np.empty(24, dtype=np.uint8)
    assert eventtext._time(ms, out, 0) == 24
    assert out.tobytes().decode() == format_ts(ms)


def test_times_at_the_edges_of_the_calendar() -> None:
    out = np.empty(24, dtype=np.uint8)
    for ms in (MIN_MS, MAX_MS, 0, -1, 951_782_400_000, 4_107_456_000_000, -2_203_891_200_000):
        assert eventtext._time(ms, out, 0) == 24
        assert out.tobytes().decode() == format_ts(ms), ms
    assert eventtext._time(MIN_MS - 1, out, 0) == -1
    assert eventtext._time(MAX_MS + 1, out, 0) == -1


def test_an_event_time_past_the_calendar_is_refused() -> None:
    rows = np.array([[0, MAX_MS + 1, 0, 0, T0, T0, 0, T0]], dtype=np.int64)
    batch = EventRows(rows, ["u"], ["z"], [ZoneRules(1, 2, 3)])
    with pytest.raises(ValueError, match="years 1-9999"):
        visit_records(batch, "urn:test")


def test_an_empty_batch_writes_nothing() -> None:
    empty = EventRows(np.zeros((0, 8), dtype=np.int64), [], [], [])
    assert visit_records(empty, "urn:test") == [] and visit_lines(empty, "urn:test") == []
