"""Wire times: what `format_ts` writes is RFC 3339 UTC with milliseconds, as `datetime` would
write it, and `parse_ts` reads it back to the same millisecond, over the whole range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.timefmt import format_ts, parse_ts

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
