"""Wire time formats: RFC 3339 in, epoch milliseconds inside, RFC 3339 UTC with ms out."""

from __future__ import annotations

import re
from datetime import UTC, datetime

# RFC 3339 demands a date, a "T" (or space is *not* allowed here), a time and an explicit offset.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_ts(value: object) -> int:
    """Return epoch milliseconds (UTC) from an RFC 3339 string or integer epoch milliseconds.

    Sub-millisecond digits are truncated: the whole system works in milliseconds.
    """
    if isinstance(value, bool):  # bool is an int subclass; a flag is never a time
        raise ValueError("must be an RFC 3339 string or integer epoch milliseconds, not a boolean")
    if isinstance(value, int):
        if not -62_135_596_800_000 <= value <= 253_402_300_799_999:
            raise ValueError("epoch milliseconds out of range (years 1–9999)")
        return value
    if isinstance(value, str):
        if not _RFC3339.match(value):
            raise ValueError(
                "must be RFC 3339 with a 'Z' or numeric offset, e.g. 2026-05-14T18:00:05.000Z"
            )
        text = value.replace("t", "T").replace("z", "Z")
        frac = ""
        dot = text.find(".")
        if dot != -1:
            end = dot + 1
            while end < len(text) and text[end].isdigit():
                end += 1
            frac = text[dot + 1 : end]
            text = text[:dot] + text[end:]
        try:
            dt = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"not a valid date or time: {exc}") from None
        millis = int((frac + "000")[:3]) if frac else 0
        delta = dt - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1000 + millis
    raise ValueError("must be an RFC 3339 string or integer epoch milliseconds")


def format_ts(ms: int) -> str:
    """Epoch milliseconds -> RFC 3339 UTC with milliseconds and 'Z'."""
    seconds, millis = divmod(ms, 1000)
    dt = datetime.fromtimestamp(seconds, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"
