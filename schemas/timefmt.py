"""Wire time formats: RFC 3339 in, epoch milliseconds inside, RFC 3339 UTC with ms out."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

# RFC 3339 demands a date, a "T" (or space is *not* allowed here), a time and an explicit offset.
# ASCII digits only: \d alone would take any script's digits, which RFC 3339 does not allow.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# The end of every time written here, ".123Z", by millisecond, and back (ASCII digits only): a
# tuple index and a dict lookup instead of formatting or parsing the digits.
MS_SUFFIX = tuple(f".{ms:03d}Z" for ms in range(1000))
SUFFIX_MS = {suffix: ms for ms, suffix in enumerate(MS_SUFFIX)}
_MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def parse_ts(value: object) -> int:
    """Return epoch milliseconds (UTC) from an RFC 3339 string or integer epoch milliseconds.

    Sub-millisecond digits are truncated: the whole system works in milliseconds.
    """
    if isinstance(value, bool):  # bool is an int subclass; a flag is never a time
        raise ValueError("must be an RFC 3339 string or integer epoch milliseconds, not a boolean")
    if isinstance(value, int):
        if not _MIN_MS <= value <= _MAX_MS:
            raise ValueError("epoch milliseconds out of range (years 1–9999)")
        return value
    if isinstance(value, str):
        millis = SUFFIX_MS.get(value[19:]) if len(value) == 24 else None
        if millis is not None:
            # The canonical form every service writes: the seconds part is cached.
            seconds = _canonical_second(value[:19])
            if seconds is not None:
                return seconds + millis
        if not _RFC3339.match(value):
            raise ValueError(
                "must be RFC 3339 with a 'Z' or numeric offset, e.g. 2026-05-14T18:00:05.000Z"
            )
        try:
            # 3.11's fromisoformat reads 'Z' and any number of fraction digits (truncating
            # past microseconds); the regex above has already refused what RFC 3339 does not allow.
            dt = datetime.fromisoformat(
                value.upper() if value[10] == "t" or value[-1] == "z" else value
            )
        except ValueError as exc:
            raise ValueError(f"not a valid date or time: {exc}") from None
        ms = (dt - _EPOCH) // _MS
        if not _MIN_MS <= ms <= _MAX_MS:
            # An offset can carry year 1 or 9999 past the range UTC can be written in.
            raise ValueError("out of range once converted to UTC (years 1–9999)")
        return ms
    raise ValueError("must be an RFC 3339 string or integer epoch milliseconds")


def format_ts(ms: int) -> str:
    """Epoch milliseconds -> RFC 3339 UTC with milliseconds and 'Z'."""
    seconds, millis = divmod(ms, 1000)
    return _format_second(seconds) + MS_SUFFIX[millis]


@lru_cache(maxsize=65_536)
def _format_second(seconds: int) -> str:
    # Output times cluster within a stream's last few minutes: the cache turns strftime into a
    # dict lookup on the replay's hot path.
    t = _EPOCH + timedelta(seconds=seconds)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"


@lru_cache(maxsize=65_536)
def _canonical_second(text: str) -> int | None:
    if not _RFC3339.match(text + "Z"):
        return None
    try:
        dt = datetime.fromisoformat(text + "+00:00")
    except ValueError:
        return None
    return (dt - _EPOCH) // _MS


def ms_to_datetime(ms: int) -> datetime:
    """Epoch milliseconds -> aware UTC datetime (exact: no float on the way)."""
    return _EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(dt: datetime) -> int:
    """Aware datetime (as PostgreSQL returns timestamptz) -> epoch milliseconds."""
    return (dt - _EPOCH) // _MS
