"""`visit_records` and `visit_lines` write, from event rows, the bytes orjson makes of
`visit_cloudevent`'s dicts: the definition stays the dict, the hot path skips it."""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dosage.core import events
from services.dosage.core.events import visit_cloudevent, visit_lines, visit_records
from services.dosage.core.params import ZoneRules
from services.dosage.core.tracker import END_REASONS, EVENT_KINDS, EventRows

T0 = 1_779_000_000_000  # 2026-05-17
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


def test_durations_are_orjson_floats_to_a_millisecond() -> None:
    whole_range = np.arange(0, 3_000_000)
    rng = np.random.default_rng(7)
    sample = np.concatenate([whole_range, rng.integers(0, 10**15, 300_000)]).tolist()
    for ms in sample:
        whole, part = divmod(ms, 1000)
        assert f"{whole}{events._FRACTIONS[part]}".encode() == orjson.dumps(ms / 1000.0), ms


@given(st.text())
def test_ids_hash_as_hashlib_sha256(text: str) -> None:
    expected = hashlib.sha256(text.encode()).hexdigest()[:32]
    assert events._digest(text) == expected


def test_an_empty_batch_writes_nothing() -> None:
    empty = EventRows(np.zeros((0, 8), dtype=np.int64), [], [], [])
    assert visit_records(empty, "urn:test") == [] and visit_lines(empty, "urn:test") == []
