"""Wire times: what `format_ts` writes is RFC 3339 UTC with milliseconds, as `datetime` would
write it, and `parse_ts` reads it back to the same millisecond, over the whole range;
`canonical_times` reads a column of them as `parse_ts` does, or refuses the column."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.timefmt import canonical_times, format_ts, parse_ts

MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999  # years 1 and 9999
YEAR_1000_MS = -30_610_224_000_000  # years before it are written with leading zeros
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def by_datetime(ms: int) -> str:
    # isoformat, not strftime: glibc's %Y writes year 5 as "5".
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")[:-6] + "Z"


@given(st.one_of(st.integers(MIN_MS, MAX_MS), st.integers(MIN_MS, YEAR_1000_MS - 1)))
def test_format_matches_datetime_and_parses_back(ms: int) -> None:
    text = format_ts(ms)
    assert text == by_datetime(ms)
    assert parse_ts(text) == ms


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),  # before the epoch the milliseconds still count up
        (1_778_781_600_007, "2026-05-14T18:00:00.007Z"),
        (1_778_781_600_999, "2026-05-14T18:00:00.999Z"),
        (MIN_MS, "0001-01-01T00:00:00.000Z"),
        (MAX_MS, "9999-12-31T23:59:59.999Z"),
    ],
)
def test_format_table(ms: int, text: str) -> None:
    assert format_ts(ms) == text
    assert parse_ts(text) == ms


def _parsed(value: object) -> int | None:
    try:
        return parse_ts(value)
    except ValueError:
        return None


@given(st.lists(st.integers(MIN_MS, MAX_MS), min_size=1, max_size=50))
def test_a_column_of_canonical_times_reads_as_parse_ts_reads_each(column: list[int]) -> None:
    assert canonical_times([format_ts(ms) for ms in column]) == column


# Near-canonical text: every byte a canonical time holds, and what may sit in its place.
NEAR = st.text(st.sampled_from("0123456789-T:.Z|tz +"), min_size=22, max_size=26)


def _around(*edges: int) -> st.SearchStrategy[int]:
    """Values at and beside each edge, where a date's rules change."""
    return st.sampled_from(sorted({e + d for e in edges for d in (-1, 0, 1) if e + d >= 0}))


# The canonical layout, each field drawn at and beside the edges of what is valid.
CANONICAL = st.builds(
    lambda y, mo, d, h, mi, s, ms: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}.{ms:03d}Z",
    st.one_of(_around(0, 1900, 2000, 2024, 2026, 9998), st.integers(0, 9999)),
    _around(0, 2, 12), _around(0, 28, 30, 31), _around(0, 23), _around(0, 59), _around(0, 59),
    st.sampled_from([0, 1, 998, 999]),
)  # fmt: skip


def test_leap_days_read() -> None:
    days = ["2000-02-29T12:00:00.000Z", "2024-02-29T00:00:00.000Z", "2026-12-31T23:59:59.999Z"]
    assert canonical_times(days) == [parse_ts(d) for d in days]


@settings(max_examples=500)
@given(CANONICAL)
def test_a_canonical_layout_reads_exactly_when_parse_ts_does(text: str) -> None:
    assert canonical_times([text]) == (None if (ms := _parsed(text)) is None else [ms])


@given(st.lists(st.one_of(CANONICAL, NEAR, st.integers(MIN_MS, MAX_MS)), min_size=1, max_size=4))
def test_a_column_reads_as_parse_ts_or_not_at_all(values: list[object]) -> None:
    """Any value parse_ts refuses, or a non-canonical one, sends the column one by one (None);
    a column of canonical times that parse_ts reads is read, to the same millisecond."""
    expected = [_parsed(v) for v in values]
    got = canonical_times(values)
    if got is not None:
        assert got == expected
    # Each as format_ts writes the time parse_ts reads in it: then the column is read.
    if all(ms is not None and v == format_ts(ms) for v, ms in zip(values, expected, strict=True)):
        assert got == expected


@pytest.mark.parametrize(
    "column",
    [
        # Each wrong alone, and together exactly the bytes of two canonical times.
        ["2026-05-14T18:00:05.123", "Z2026-05-14T18:00:05.123Z"],
        ["2026-05-14T18:00:05.123Z|", "2026-05-14T18:00:05.123Z"[1:]],
        ["2026-02-29T00:00:00.000Z"],  # no such day
        ["1900-02-29T00:00:00.000Z"],  # nor in a century not divisible by 400
        ["2026-04-31T00:00:00.000Z"],
        ["0000-01-01T00:00:00.000Z"],  # no year 0
        ["2026-05-14T24:00:00.000Z"],
        ["2026-05-14T23:59:60.000Z"],
        ["2026-05-14t18:00:05.123Z"],  # parse_ts reads it, one by one
        ["２026-05-14T18:00:05.123Z"],
        [],
    ],
)
def test_columns_that_are_not_all_canonical_are_refused(column: list[object]) -> None:
    assert canonical_times(column) is None
