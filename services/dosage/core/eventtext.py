"""Visit events' CloudEvents JSON, written for a whole batch of event rows by compiled code.

`events.visit_cloudevent` is the definition (a dict, which orjson writes); this writes the same
bytes without a dict, a string or a hash object per event. Written in Python, an f-string per
event, it cost the geofence service 3-4 us an event, a fifth of its CPU. Here Python only
looks up each distinct id's text once per batch and slices the finished documents apart.

What the compiled part needs arrives as byte arrays of pieces: the fixed JSON fragments, the
event types, the end reasons and the source (`EventWriter._pieces`), and the ids both as JSON
strings (quoted, escaped by orjson) and as UTF-8, for the event id's hash (`_IdPieces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import orjson

from services.dosage.core import tables as tb
from services.dosage.core.compiled import compiled, inlined
from services.dosage.core.params import ZoneRules

# Fixed fragments, in the order the writer uses their numbers (below).
_FIXED = (
    '{"specversion":"1.0","id":"',  # 0
    '","source":',  # 1
    ',"type":"',  # 2
    '","time":"',  # 3
    '","subject":',  # 4
    ',"datacontenttype":"application/json","data":',  # 5
    ',"streamclock":"',  # 6
    '"}',  # 7
    '{"unit_id":',  # 8
    ',"zone_id":',  # 9
    ',"started_at":"',  # 10
    '","ended_at":"',  # 11
    '","last_in":"',  # 12
    '","duration_s":',  # 13
    ',"qualified":',  # 14
    ',"target_met":',  # 15
    ',"overstay":',  # 16
    ',"target_s":',  # 17
    ',"max_visit_s":',  # 18
    "}",  # 19
    "false",  # 20
    "true",  # 21
)
_TYPES_AT = len(_FIXED)
_FRAGMENTS_MAX = sum(len(f) for f in _FIXED)
# A time, a number of milliseconds as seconds (sign, 19 digits, point, 3 digits), an id hash.
_TIME, _NUMBER, _HASH = 24, 24, 32


class _IdPieces(dict[str, int]):
    """Ids by number, each id's JSON string and UTF-8 in `text` at `spans[number]` (JSON start
    and end, UTF-8 start and end) and its UTF-8 as bytes in `raw` (a record's key). Numbered as
    they first come; `reset` when it holds enough, between batches."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.clear()
        self.text = np.empty(1 << 14, dtype=np.uint8)
        self.spans = np.empty((1 << 8, 4), dtype=np.int64)
        self.raw: list[bytes] = []
        self.used = 0
        self.longest = 0  # the longest JSON string: UTF-8 is never longer

    def __missing__(self, value: str) -> int:
        json, raw = orjson.dumps(value), value.encode()
        k, at, size = len(self), self.used, len(json) + len(raw)
        while at + size > len(self.text):
            self.text = np.concatenate([self.text, np.empty_like(self.text)])
        if k == len(self.spans):
            self.spans = np.concatenate([self.spans, np.empty_like(self.spans)])
        self.text[at : at + size] = np.frombuffer(json + raw, dtype=np.uint8)
        self.spans[k] = (at, at + len(json), at + len(json), at + size)
        self.used = at + size
        self.longest = max(self.longest, len(json))
        self.raw.append(raw)
        self[value] = k
        return k


_IDS_MAX = 65_536


class EventWriter:
    """Writes visit event rows as CloudEvents JSON: `types[k]` is kind k's CloudEvents type,
    `ended` the kind whose data is the ended visit's row, `reasons[r]` that row's
    `,"end_reason":"..."` for end reason r."""

    def __init__(self, types: tuple[str, ...], ended: int, reasons: tuple[str, ...]) -> None:
        self._fixed = [p.encode() for p in (*_FIXED, *types, *reasons)]
        self._types, self._ended, self._reasons = len(types), ended, len(reasons)
        self._longest_kind = max(len(p) for p in self._fixed[_TYPES_AT:])
        self._sources: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        self._ids = _IdPieces()

    def _pieces(self, source: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The fixed pieces and the source (last), as one array, and where each starts."""
        found = self._sources.get(source)
        if found is None:
            if len(self._sources) >= 64:
                self._sources.clear()
            pieces = [*self._fixed, orjson.dumps(source)]
            starts = np.zeros(len(pieces) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in pieces], out=starts[1:])
            found = self._sources[source] = (np.frombuffer(b"".join(pieces), np.uint8), starts)
        return found

    def write(
        self,
        rows: np.ndarray[Any, np.dtype[np.int64]],
        unit_ids: Sequence[str],
        zone_ids: Sequence[str],
        rules: Sequence[ZoneRules],
        source: str,
        lines: bool,
    ) -> tuple[list[bytes], list[bytes], list[bytes | None]]:
        """Each row's document, its key (the zone id) and, if `lines`, the ended visit's row
        (None for other kinds); as lines, documents and rows end with a newline. The rows
        number units, zones and rules as `tracker.EventRows` does."""
        n = len(rows)
        if n == 0:
            return [], [], []
        ids = self._ids
        if len(ids) >= _IDS_MAX:
            ids.reset()
        us, zs = rows[:, tb.E_UNIT].tolist(), rows[:, tb.E_ZONE].tolist()
        unit_k = np.fromiter(map(ids.__getitem__, map(unit_ids.__getitem__, us)), np.int64, n)
        zone_k = np.fromiter(map(ids.__getitem__, map(zone_ids.__getitem__, zs)), np.int64, n)
        distinct = {z: i for i, z in enumerate(dict.fromkeys(zs))}
        rule_k = np.fromiter(map(distinct.__getitem__, zs), np.int64, n)
        thresholds = np.array(
            [
                (r.min_visit_ms, r.target_ms, r.max_visit_ms)
                for r in map(rules.__getitem__, distinct)
            ],
            dtype=np.int64,
        )
        fixed, starts = self._pieces(source)
        per_event = (
            _FRAGMENTS_MAX + 2 * self._longest_kind + int(starts[-1] - starts[-2]) + 4 * ids.longest
            + 4 * _TIME + 3 * _NUMBER + _HASH + 1
        )  # fmt: skip
        out = np.empty(n * per_event, dtype=np.uint8)
        # The hashed text: the type, the ids and the start, each after a separator, then
        # SHA-256's padding (at most 72 bytes).
        message = np.empty(self._longest_kind + 2 * ids.longest + _NUMBER + 80, np.uint8)
        doc_at = np.empty(n + 1, dtype=np.int64)
        data_at = np.empty((n, 2), dtype=np.int64)
        code = _write(rows, unit_k, zone_k, rule_k, thresholds, fixed, starts, ids.text,
                      ids.spans, self._types, self._ended, self._reasons, lines, out, message,
                      doc_at, data_at)  # fmt: skip
        if code < 0:
            raise ValueError("a visit event's time is outside years 1-9999")
        docs = out[: doc_at[n]].tobytes()
        values = [docs[a:b] for a, b in pairwise(doc_at.tolist())]
        keys = list(map(ids.raw.__getitem__, zone_k.tolist()))
        data: list[bytes | None] = []
        if lines:
            ended = self._ended
            data = [
                docs[s:e] + b"\n" if k == ended else None
                for k, (s, e) in zip(rows[:, tb.E_KIND].tolist(), data_at.tolist(), strict=True)
            ]
        return values, keys, data


# -- the compiled writer -------------------------------------------------------------------

_MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_ROUND = np.array([
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4,
    0xAB1C5ED5, 0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE,
    0x9BDC06A7, 0xC19BF174, 0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F,
    0x4A7484AA, 0x5CB0A9DC, 0x76F988DA, 0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7,
    0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967, 0x27B70A85, 0x2E1B2138, 0x4D2C6DFC,
    0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85, 0xA2BFE8A1, 0xA81A664B,
    0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070, 0x19A4C116,
    0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7,
    0xC67178F2,
], dtype=np.uint32)  # fmt: skip
_INITIAL = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C,
                     0x1F83D9AB, 0x5BE0CD19], dtype=np.uint32)  # fmt: skip
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@inlined
def _rotr(x: np.uint32, n: int) -> np.uint32:
    return np.uint32((x >> np.uint32(n)) | (x << np.uint32(32 - n)))


@compiled
def sha256_hex(message: np.ndarray, length: int, w: np.ndarray, out: np.ndarray, at: int) -> int:
    """The first 32 hex digits of the SHA-256 of message[:length] into out[at:]; `message`
    must have room for the padding after `length` (72 bytes), `w` 64 uint32s. Returns
    at + 32. In 32-bit words held in locals: 0.22 us a block here, against 0.55 in 64-bit
    words masked and an array for the state."""
    padded = (length + 8) // 64 * 64 + 64
    message[length] = 0x80
    for k in range(length + 1, padded - 8):
        message[k] = 0
    bits = length * 8
    for k in range(8):
        message[padded - 1 - k] = (bits >> (8 * k)) & 0xFF
    h0, h1, h2, h3 = _INITIAL[0], _INITIAL[1], _INITIAL[2], _INITIAL[3]
    h4, h5, h6, h7 = _INITIAL[4], _INITIAL[5], _INITIAL[6], _INITIAL[7]
    for block in range(0, padded, 64):
        for t in range(16):
            b = block + 4 * t
            word = np.uint32(0)
            for k in range(4):
                word = (word << np.uint32(8)) | np.uint32(message[b + k])
            w[t] = word
        for t in range(16, 64):
            x, y = w[t - 15], w[t - 2]
            s0 = _rotr(x, 7) ^ _rotr(x, 18) ^ (x >> np.uint32(3))
            s1 = _rotr(y, 17) ^ _rotr(y, 19) ^ (y >> np.uint32(10))
            w[t] = np.uint32(w[t - 16] + s0 + w[t - 7] + s1)
        a, b_, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
        for t in range(64):
            s1 = _rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)
            choice = (e & f) ^ (~e & g)
            t1 = np.uint32(h + s1 + choice + _ROUND[t] + w[t])
            s0 = _rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)
            majority = (a & b_) ^ (a & c) ^ (b_ & c)
            t2 = np.uint32(s0 + majority)
            h, g, f, e = g, f, e, np.uint32(d + t1)
            d, c, b_, a = c, b_, a, np.uint32(t1 + t2)
        h0, h1, h2, h3 = np.uint32(h0 + a), np.uint32(h1 + b_), np.uint32(h2 + c), np.uint32(h3 + d)
        h4, h5, h6, h7 = np.uint32(h4 + e), np.uint32(h5 + f), np.uint32(h6 + g), np.uint32(h7 + h)
    for word in (h0, h1, h2, h3):  # the first 16 bytes: 32 hex digits
        for nibble in range(8):
            out[at] = _HEX[(word >> np.uint32(28 - 4 * nibble)) & np.uint32(0xF)]
            at += 1
    return at


@inlined
def _piece(pieces: np.ndarray, starts: np.ndarray, i: int, out: np.ndarray, at: int) -> int:
    return _copy(pieces, starts[i], starts[i + 1], out, at)


@inlined
def _copy(source: np.ndarray, start: int, end: int, out: np.ndarray, at: int) -> int:
    for k in range(start, end):
        out[at] = source[k]
        at += 1
    return at


@inlined
def _digits(value: int, out: np.ndarray, at: int) -> int:
    """A non-negative integer in decimal."""
    width = 1
    rest = value // 10
    while rest > 0:
        width += 1
        rest //= 10
    for k in range(width - 1, -1, -1):
        out[at + k] = 48 + value % 10
        value //= 10
    return at + width


@inlined
def _seconds(ms: int, out: np.ndarray, at: int) -> int:
    """Milliseconds as seconds, as orjson writes ms / 1000.0 below 10^15 ms: the whole
    seconds, a point and the thousandths without trailing zeros ("0" if none)."""
    if ms < 0:
        out[at] = 45  # -
        at += 1
        ms = -ms
    at = _digits(ms // 1000, out, at)
    out[at] = 46  # .
    at += 1
    part = ms % 1000
    if part == 0:
        out[at] = 48
        return at + 1
    for divisor in (100, 10, 1):
        out[at] = 48 + part // divisor % 10
        at += 1
        if part % divisor == 0:
            break
    return at


@inlined
def _two(value: int, out: np.ndarray, at: int) -> None:
    out[at] = 48 + value // 10
    out[at + 1] = 48 + value % 10


@inlined
def _time(ms: int, out: np.ndarray, at: int) -> int:
    """`format_ts`: "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC); -1 outside years 1 to 9999."""
    if ms < _MIN_MS or ms > _MAX_MS:
        return -1
    seconds = ms // 1000
    days = seconds // 86_400
    of_day = seconds - days * 86_400
    # The civil date of a day count (H. Hinnant's civil_from_days).
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    _two(year // 100, out, at)
    _two(year % 100, out, at + 2)
    out[at + 4] = 45
    _two(month, out, at + 5)
    out[at + 7] = 45
    _two(day, out, at + 8)
    out[at + 10] = 84  # T
    _two(of_day // 3600, out, at + 11)
    out[at + 13] = 58
    _two(of_day // 60 % 60, out, at + 14)
    out[at + 16] = 58
    _two(of_day % 60, out, at + 17)
    out[at + 19] = 46
    millis = ms - seconds * 1000
    out[at + 20] = 48 + millis // 100
    _two(millis % 100, out, at + 21)
    out[at + 23] = 90  # Z
    return at + 24


@compiled
def _write(
    rows: np.ndarray, unit_k: np.ndarray, zone_k: np.ndarray, rule_k: np.ndarray,
    thresholds: np.ndarray, fixed: np.ndarray, starts: np.ndarray, text: np.ndarray,
    spans: np.ndarray, types: int, ended: int, reasons: int, lines: bool, out: np.ndarray,
    message: np.ndarray, doc_at: np.ndarray, data_at: np.ndarray,
) -> int:  # fmt: skip
    """Each row's document into `out`, where `doc_at` marks where each begins (and, last,
    where the final one ends) and `data_at` where its data object begins and ends. -1 if a
    time is outside years 1 to 9999."""
    type_at = _TYPES_AT
    reason_at = type_at + types
    source = reason_at + reasons
    w = np.empty(64, dtype=np.uint32)
    at = 0
    for i in range(len(rows)):
        kind, when, started, last_in = rows[i, 0], rows[i, 1], rows[i, 4], rows[i, 5]
        reason, clock = rows[i, 6], rows[i, 7]
        u, z, r = unit_k[i], zone_k[i], rule_k[i]
        doc_at[i] = at
        # The id: SHA-256 of "type\x1funit\x1fzone\x1fstarted".
        m = _piece(fixed, starts, type_at + kind, message, 0)
        message[m] = 0x1F
        m = _copy(text, spans[u, 2], spans[u, 3], message, m + 1)
        message[m] = 0x1F
        m = _copy(text, spans[z, 2], spans[z, 3], message, m + 1)
        message[m] = 0x1F
        m += 1
        if started < 0:
            message[m] = 45  # -
            m = _digits(-started, message, m + 1)
        else:
            m = _digits(started, message, m)
        at = _piece(fixed, starts, 0, out, at)
        at = sha256_hex(message, m, w, out, at)
        at = _piece(fixed, starts, 1, out, at)
        at = _piece(fixed, starts, source, out, at)
        at = _piece(fixed, starts, 2, out, at)
        at = _piece(fixed, starts, type_at + kind, out, at)
        at = _piece(fixed, starts, 3, out, at)
        at = _time(when, out, at)
        if at < 0:
            return -1
        at = _piece(fixed, starts, 4, out, at)
        at = _copy(text, spans[z, 0], spans[z, 1], out, at)
        at = _piece(fixed, starts, 5, out, at)
        data_at[i, 0] = at
        at = _piece(fixed, starts, 8, out, at)
        at = _copy(text, spans[u, 0], spans[u, 1], out, at)
        at = _piece(fixed, starts, 9, out, at)
        at = _copy(text, spans[z, 0], spans[z, 1], out, at)
        at = _piece(fixed, starts, 10, out, at)
        at = _time(started, out, at)
        if at < 0:
            return -1
        at = _piece(fixed, starts, 11 if kind == ended else 12, out, at)
        at = _time(last_in, out, at)
        if at < 0:
            return -1
        at = _piece(fixed, starts, 13, out, at)
        duration = last_in - started
        at = _seconds(duration, out, at)
        if kind == ended:
            at = _piece(fixed, starts, reason_at + reason, out, at)
            at = _piece(fixed, starts, 14, out, at)
            at = _piece(fixed, starts, 21 if duration >= thresholds[r, 0] else 20, out, at)
            at = _piece(fixed, starts, 15, out, at)
            at = _piece(fixed, starts, 21 if duration >= thresholds[r, 1] else 20, out, at)
            at = _piece(fixed, starts, 16, out, at)
            at = _piece(fixed, starts, 21 if duration > thresholds[r, 2] else 20, out, at)
        else:
            at = _piece(fixed, starts, 17, out, at)
            at = _seconds(thresholds[r, 1], out, at)
            at = _piece(fixed, starts, 18, out, at)
            at = _seconds(thresholds[r, 2], out, at)
        at = _piece(fixed, starts, 19, out, at)
        data_at[i, 1] = at
        at = _piece(fixed, starts, 6, out, at)
        at = _time(clock, out, at)
        if at < 0:
            return -1
        at = _piece(fixed, starts, 7, out, at)
        if lines:
            out[at] = 10
            at += 1
    doc_at[len(rows)] = at
    return at
