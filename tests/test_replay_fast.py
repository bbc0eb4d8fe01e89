"""The replay's fast ping reader accepts only what the `Ping` model accepts, with the same values;
everything else goes the model's way, so rejected lines keep their errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from dosewatch.replay import decode_lines
from schemas.fastping import FastPings, PingColumns
from schemas.ping import Ping, validate_ping

SAMPLE = Path(__file__).parent / "data" / "evening-shift" / "pings.jsonl"
Runs = dict[str, list[bytes]]  # named runs of lines (or record values)
GOOD: dict[str, Any] = {
    "unit_id": "u1",
    "ts": "2026-05-14T18:00:05.123Z",
    "lat": 40.7,
    "lon": -74.0,
}


def model(line: bytes) -> tuple[str, int, float, float, float | None] | None:
    """What the slow path makes of a line holding one ping (None: rejected or not one ping)."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    p = validate_ping(value)
    if not isinstance(p, Ping):
        return None
    return p.unit_id, p.ts, p.lon, p.lat, p.accuracy_m


def same(line: bytes) -> None:
    got, want = FastPings().read(line), model(line)
    if got is None:
        return  # the model decides: correct whatever it says
    assert want is not None, line
    assert [(type(v), repr(v)) for v in got] == [(type(v), repr(v)) for v in want], line


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


CASES: list[dict[str, Any]] = [
    {"lat": 90},
    {"lat": 90.0000001},
    {"lat": -90},
    {"lon": 180},
    {"lon": -180.5},
    {"lat": "40.7"},
    {"lat": True},
    {"lat": None},
    {"lat": 10**400},
    {"lat": -0.0},
    {"lat": 0.0, "lon": 0.0},  # null island
    {"lat": -0.0, "lon": 0},
    {"lat": 0, "lon": 1e-300},
    {"extra": 1},
    {"accuracy_m": -1},
    {"accuracy_m": 12},
    {"accuracy_m": None},
    {"speed_mps": -0.0},
    {"speed_mps": -1e-300},
    {"heading_deg": 360},
    {"heading_deg": 359.9999},
    {"heading_deg": -0.0},
    {"source": 5},
    {"source": "é😀"},
    {"source": "\ud800"},
    {"unit_id": "bad id"},
    {"unit_id": ""},
    {"unit_id": "a" * 64},
    {"unit_id": "a" * 65},
    {"unit_id": "u1\n"},
    {"unit_id": "é"},
    {"unit_id": 5},
    {"ts": "2026-05-14T18:00:05"},
    {"ts": "2026-05-14T18:00:05.123456+02:00"},
    {"ts": "2026-05-14t18:00:05.1z"},
    {"ts": "2026-05-14T18:00:05.12Z"},
    {"ts": "2026-02-30T18:00:05.000Z"},
    {"ts": "2026-05-14T24:00:05.000Z"},
    {"ts": "2026-05-14T18:00:05.٣٣٣Z"},
    {"ts": "2026-05-14T18:00:05.000z"},
    {"ts": " 2026-05-14T18:00:05.000Z"},
    {"ts": 1778781605000},
    {"ts": 1778781605000.0},
    {"ts": True},
    {"ts": -62135596800001},
    {"ts": 253402300799999},
    {"ts": 253402300800000},
    {"ts": 10**30},
    {"ts": "0001-01-01T00:00:00.000Z"},
    {"ts": "0001-01-01T00:00:00+01:00"},
    {"ts": "9999-12-31T23:59:59.999Z"},
    {"ts": "9999-12-31T23:59:59-01:00"},
]


def test_cases_against_the_model() -> None:
    accepted = 0
    for change in CASES:
        line = dumps(GOOD | change)
        same(line)
        accepted += FastPings().read(line) is not None
    for key in GOOD:
        same(dumps({k: v for k, v in GOOD.items() if k != key}))
    assert 10 < accepted < len(CASES) - 20


def test_raw_lines_against_the_model() -> None:
    body = b'"unit_id":"u1","ts":"2026-05-14T18:00:00Z","lat":40.7,"lon":-74.0'
    for line in [
        b"",
        b"   \n",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b"[" + dumps(GOOD) + b"]",
        b"null",
        b"{" + body + b"}\r\n",
        b"{" + body + b"} x",
        b"{" + body + b',"lat":91}',
        b'{"lat":91,' + body + b"}",
        b"{" + body + b',"lat":1e999}',
        b"{" + body + b',"source":"\\ud800"}',
        b"{" + body + b',"source":"\\udc00\\ud800"}',
        b"{" + body + b',"source":"\xed\xa0\x80"}',
        b"{" + body + b',"source":"a\x01"}',
        b"\xef\xbb\xbf{" + body + b"}",
        b"{" + body + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b"{" + body + b",}",
        b'{"unit_id":"u1","ts":"2026-05-14T18:00:00Z","lat":01.5,"lon":-74.0}',
    ]:
        same(line)
    assert FastPings().read(b"{" + body + b"}\n") == ("u1", 1778781600000, -74.0, 40.7, None)


def test_sample_read_the_same_both_ways() -> None:
    fast = FastPings()
    lines = SAMPLE.read_bytes().splitlines()
    for line in lines:
        got = fast.read(line)
        assert got is not None
        assert got == model(line)
    fixes = [f for f, _ in decode_lines(enumerate(lines, start=1)) if f is not None]
    assert len(fixes) == len(lines)


finite = st.floats(allow_nan=False, allow_infinity=False)
value = st.one_of(
    finite,
    st.floats(-200, 400),
    st.integers(-(10**20), 10**20),
    st.none(),
    st.booleans(),
    st.text(max_size=30),
    st.datetimes(timezones=st.just(__import__("datetime").UTC)).map(
        lambda d: d.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*GOOD, "accuracy_m", "speed_mps", "heading_deg", "source", "other"]),
        value,
    ),
    st.booleans(),
)
def test_random_pings_against_the_model(change: dict[str, Any], whole: bool) -> None:
    ping = change if whole else GOOD | change
    if any(isinstance(v, float) and not math.isfinite(v) for v in ping.values()):
        return
    same(dumps(ping))


def by_line(lines: list[bytes]) -> tuple[list[Any], list[int]]:
    fast = FastPings()
    read = [fast.read(line) for line in lines]
    return [p for p in read if p is not None], [k for k, p in enumerate(read) if p is None]


def line_runs() -> Runs:
    good = [
        dumps(GOOD | {"ts": 1778781600000 + k, "lat": 40.0 + k / 1e4}) + b"\n" for k in range(9)
    ]
    body = dumps(GOOD)[1:-1]
    return {
        "all good": good,
        "last line without newline": [*good[:-1], good[-1].rstrip(b"\n")],
        "windows newlines": [g.replace(b"\n", b"\r\n") for g in good],
        "a blank line": [*good[:3], b"\n", *good[3:]],
        "leading blanks": [*good[:3], b"  " + good[3], *good[4:]],
        # A ping cut over two lines, and a line holding two pings: as many values as lines
        "split and doubled": [
            *good[:2],
            b"{" + body.split(b',"lat"')[0] + b"\n",
            b'"lat":40.7,"lon":-74.0}\n',
            good[3].rstrip(b"\n") + b"," + good[4],
            *good[5:],
        ],
        "two pings apart on one line": [*good[:2], good[2].rstrip(b"\n") + b"\r" + good[3]],
        "an array line": [*good[:2], b"[" + good[2].rstrip(b"\n") + b"]\n", *good[3:]],
        "a bad time": [*good[:4], dumps(GOOD | {"ts": "2026-02-30T18:00:00.000Z"}) + b"\n"],
        "a bad unit": [*good[:4], dumps(GOOD | {"unit_id": "no spaces"}) + b"\n", *good[4:]],
        "out of range": [*good[:4], dumps(GOOD | {"lat": 90.5}) + b"\n", *good[4:]],
        "null island": [*good[:4], dumps(GOOD | {"lat": 0, "lon": 0.0}) + b"\n", *good[4:]],
        "on the equator": [*good[:4], dumps(GOOD | {"lat": 0.0}) + b"\n", *good[4:]],
        "odd but fine times": [
            *good[:2],
            dumps(GOOD | {"ts": "2026-05-14T18:00:05+02:00"}) + b"\n",
            *good[2:],
        ],
        "digits of another script": [
            *good[:2],
            dumps(GOOD | {"ts": "2026-05-14T18:00:05.٣٣٣Z"}) + b"\n",
            *good[2:],
        ],
        "one line": good[:1],
    }


def reads_as_read_does(read_run: Callable[[list[bytes]], PingColumns], runs: Runs) -> None:
    """Each run read in one call by a reader of its own, as `read` reads it line by line."""
    for name, lines in runs.items():
        read = read_run(lines)
        pings, unread = by_line(lines)
        got = list(zip(read.unit_id, read.ts, read.lon, read.lat, read.accuracy_m, strict=True))
        assert (got, read.unread) == (pings, unread), name


def test_read_lines_reads_each_line_as_read_does() -> None:
    runs = line_runs()
    reads_as_read_does(lambda lines: FastPings().read_lines(lines), runs)
    assert FastPings().read_lines(runs["all good"]).unread == []
    assert FastPings().read_lines(runs["split and doubled"]).unread == [2, 3, 4]
    assert FastPings().read_lines(runs["null island"]).unread == [4]
    assert FastPings().read_lines(runs["digits of another script"]).unread == [2]
    assert FastPings().read_lines(runs["on the equator"]).unread == []


def test_read_values_reads_each_message_as_read_does() -> None:
    """Kafka record values: messages without a newline of their own, read as lines are. A
    message of several lines is not one line, so a run holding one is read message by message,
    and a message cannot lend its tail to the next."""
    runs = {name: [line.rstrip(b"\r\n") for line in lines] for name, lines in line_runs().items()}
    good = runs["all good"]
    pretty = orjson.dumps(GOOD, option=orjson.OPT_INDENT_2)
    first, rest = dumps(GOOD).split(b', "lon"')
    runs |= {
        "a message of several lines": [*good[:3], pretty, *good[3:]],
        "a message holding a seam": [*good[:3], good[3] + b"\n," + good[4], *good[5:]],
        "a tail lent to the next message": [
            *good[:3],
            good[3] + b"\n," + first,
            b'"lon"' + rest,
            *good[4:],
        ],
        "no messages": [],
    }
    reads_as_read_does(lambda values: FastPings().read_values(values), runs)
    assert FastPings().read_values(runs["all good"]).unread == []
    assert FastPings().read_values(runs["a message of several lines"]).unread == []
    assert FastPings().read_values(runs["a tail lent to the next message"]).unread == [3, 4]


def test_sample_read_in_runs() -> None:
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    fast = FastPings()
    columns = [fast.read_lines(lines[k : k + 1000]) for k in range(0, len(lines), 1000)]
    got = [
        p for c in columns for p in zip(c.unit_id, c.ts, c.lon, c.lat, c.accuracy_m, strict=True)
    ]
    assert got == by_line(lines)[0]
