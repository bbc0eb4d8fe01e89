"""Ingest's fast path writes exactly what the slow path (orjson + the `Ping` model + `accept`)
writes, key and value bytes included, and leaves every message it does not fully accept to the
slow path, so refused pings keep their errors and dead letters."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas.timefmt import format_ts
from services.ingest.core.fast import FastNormaliser, Normalised, _dumps_each, normalise_each
from services.ingest.core.normalise import Accepted, Limits, Rejected, normalise_message

NOW = 1_778_781_600_000  # 2026-05-14T18:00:00Z
LIMITS = Limits(NOW)
BODY = b'"unit_id":"car-1","ts":"2026-05-14T18:00:05.123Z","lat":40.7,"lon":-74.0'


def slow_batch(raws: list[bytes], limits: Limits) -> Normalised:
    """What the service did before: each message through `normalise_message`."""
    out = Normalised()
    for k, raw in enumerate(raws):
        ok, bad = normalise_message(raw, limits)
        out.keys += [a.key for a in ok]
        out.values += [a.value for a in ok]
        times = [a.ping.ts for a in ok] + ([] if out.newest_ms is None else [out.newest_ms])
        out.newest_ms = max(times, default=None)
        if bad:
            out.rejected.append((k, bad))
        out.pings += len(ok) + len(bad)
    return out


def fast_one(raw: bytes, limits: Limits = LIMITS) -> tuple[bytes, bytes, int] | None:
    """The fast path's answer for one message, checked against the slow path's."""
    got = FastNormaliser().one(raw, limits)
    ok, bad = normalise_message(raw, limits)
    if got is not None:
        assert bad == [] and len(ok) == 1, raw
        assert got == (ok[0].key, ok[0].value, ok[0].ping.ts), raw
    assert FastNormaliser().batch([raw], limits) == slow_batch([raw], limits), raw
    return got


def ping(fields: str) -> bytes:
    return b"{" + BODY + fields.encode() + b"}"


# (extra JSON after the body, or a whole message) -> does the fast path take it?
CASES: list[tuple[str, bytes, bool]] = [
    ("canonical", ping(""), True),
    ("every field", ping(',"accuracy_m":8,"speed_mps":3.5,"heading_deg":0,"source":"avl"'), True),
    ("nulls left out", ping(',"accuracy_m":null,"speed_mps":null,"source":null'), True),
    ("integer lat", b'{"unit_id":"u","ts":1778781600000,"lat":40,"lon":-74}', True),
    ("int beyond 2**53", ping(',"accuracy_m":9007199254740993'), True),
    ("int beyond 2**64", ping(',"accuracy_m":100000000000000000000'), True),
    ("u64 max", ping(',"speed_mps":18446744073709551615'), True),
    ("1e16", ping(',"accuracy_m":1e16'), True),
    ("1E+22", ping(',"accuracy_m":1E+22'), True),
    ("tiny", ping(',"accuracy_m":5e-324'), True),
    ("subnormal rounding", ping(',"accuracy_m":2.5e-324'), True),
    ("underflow", ping(',"accuracy_m":1e-400'), True),
    ("1e-7", ping(',"accuracy_m":1e-7'), True),
    ("0.00001", ping(',"accuracy_m":0.00001'), True),
    ("max float", ping(',"accuracy_m":1.7976931348623157e308'), True),
    ("overflow", ping(',"accuracy_m":1.8e308'), False),
    ("-0.0", ping(',"speed_mps":-0.0,"heading_deg":-0.0'), True),
    ("-0", ping(',"speed_mps":-0'), True),
    (
        "many digits",
        ping(',"speed_mps":1.00000000000000011102230246251565404236316680908203125'),
        True,
    ),
    ("rounds to 90", b'{"unit_id":"u","ts":0,"lat":90.000000000000000000001,"lon":0}', True),
    ("rounds to 360", ping(',"heading_deg":359.99999999999999999'), False),
    ("heading 360", ping(',"heading_deg":360'), False),
    ("lat 91 then 40", ping(',"lat":91,"lat":40'), False),
    ("lat 40 then 41", ping(',"lat":41'), True),
    ("null island", b'{"unit_id":"u","ts":0,"lat":0,"lon":0}', False),
    ("null island -0.0", b'{"unit_id":"u","ts":0,"lat":-0.0,"lon":0.0}', False),
    ("equator", b'{"unit_id":"u","ts":0,"lat":0,"lon":-74}', True),
    ("prime meridian", b'{"unit_id":"u","ts":0,"lat":51.5,"lon":0}', True),
    ("offset", b'{"unit_id":"u","ts":"2026-05-14T13:00:05.25-05:00","lat":1,"lon":2}', True),
    (
        "9 fraction digits",
        b'{"unit_id":"u","ts":"2026-05-14T18:00:05.123456789Z","lat":1,"lon":2}',
        True,
    ),
    ("1 fraction digit", b'{"unit_id":"u","ts":"2026-05-14T18:00:05.1Z","lat":1,"lon":2}', True),
    ("no fraction", b'{"unit_id":"u","ts":"2026-05-14T18:00:05Z","lat":1,"lon":2}', True),
    ("lowercase t z", b'{"unit_id":"u","ts":"2026-05-14t18:00:05.123z","lat":1,"lon":2}', True),
    ("lowercase t", b'{"unit_id":"u","ts":"2026-05-14t18:00:05.123Z","lat":1,"lon":2}', True),
    ("arabic millis", ping(',"ts":"2026-05-14T18:00:05.\\u0663\\u0663\\u0663Z"'), False),
    ("arabic year", ping(',"ts":"\\u0662026-05-14T18:00:05.123Z"'), False),
    ("naive", ping(',"ts":"2026-05-14T18:00:05"'), False),
    ("feb 30", ping(',"ts":"2026-02-30T18:00:05.000Z"'), False),
    ("year 1 with offset", ping(',"ts":"0001-01-01T00:00:00+01:00"'), False),
    ("float ts", ping(',"ts":1778781605000.0'), False),
    ("bool ts", ping(',"ts":true'), False),
    ("ts at the horizon", ping(f',"ts":{NOW + 60_000}'), True),
    ("ts past the horizon", ping(f',"ts":{NOW + 60_001}'), False),
    ("unicode source", ping(',"source":"é😀 ünïcödé"'), True),
    ("escaped source", ping(r',"source":"\u00e9\ud83d\ude00\n\t\"\\\/\u0000\u001f\u007f"'), True),
    ("source like a seam", ping(r',"source":"},{\"unit_id\":\"x\"},{"'), True),
    ("source with braces", ping(',"source":"}{}{\\n"'), True),
    ("lone surrogate", ping(r',"source":"\ud800"'), False),
    ("raw control char", ping(',"source":"a\x01"'), False),
    ("unknown field", ping(',"extra":1'), False),
    ("unit id 64", ping(',"unit_id":"' + "a" * 64 + '"'), True),
    ("unit id 65", ping(',"unit_id":"' + "a" * 65 + '"'), False),
    ("unit id newline", ping(r',"unit_id":"u\n"'), False),
    ("unit id unicode digit", ping(',"unit_id":"u٣"'), False),
    ("missing lat", b'{"unit_id":"u","ts":0,"lon":2}', False),
    ("string lat", ping(',"lat":"40.7"'), False),
    ("bool lat", ping(',"lat":true'), False),
    ("array of one", b"[" + ping("") + b"]", False),
    ("array of two", b"[" + ping("") + b"," + ping(',"lat":91') + b"]", False),
    ("empty array", b"[]", False),
    ("null", b"null", False),
    ("bad JSON", b"{not json", False),
    ("bad UTF-8", b"\xff not json", False),
    ("empty", b"", False),
    ("BOM", b"\xef\xbb\xbf" + ping(""), False),
    ("whitespace around", b" \n\t" + ping("") + b"\r\n ", True),
    ("trailing junk", ping("") + b" x", False),
    ("leading zero", ping(',"lat":01.5'), False),
    ("NaN", ping(',"lat":NaN'), False),
    ("deep nesting", ping(',"x":' + "[" * 3000 + "]" * 3000), False),
]


@pytest.mark.parametrize(("raw", "fast"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cases(raw: bytes, fast: bool) -> None:
    assert (fast_one(raw) is not None) == fast


def written_as(raw: bytes) -> bytes:
    got = fast_one(raw)
    assert got is not None
    return got[1]


def test_a_few_values_as_written() -> None:
    assert b'"lat":40.0,' in written_as(ping(',"lat":40'))  # strict pydantic: int -> float
    assert b'"accuracy_m":1e+16' in written_as(ping(',"accuracy_m":1e16'))  # orjson's form
    assert b'"speed_mps":-0.0' in written_as(ping(',"speed_mps":-0.0'))
    fields = orjson.loads(written_as(ping(',"source":"x","accuracy_m":1,"heading_deg":null')))
    assert list(fields) == ["unit_id", "ts", "lat", "lon", "accuracy_m", "source"]
    offset = b'{"unit_id":"u","ts":"2026-05-14T13:00:05.25-05:00","lat":1,"lon":2}'
    assert orjson.loads(written_as(offset))["ts"] == "2026-05-14T18:00:05.250Z"


def test_message_size_limit_is_the_slow_paths() -> None:
    raw = ping("") + b" " * 200
    limits = Limits(NOW, max_message_bytes=len(raw))
    assert fast_one(raw, limits) is not None
    assert fast_one(raw + b" ", Limits(NOW, max_message_bytes=len(raw))) is None


def test_a_batch_is_each_message_in_order() -> None:
    raws = [raw for _, raw, _ in CASES] * 3
    got = FastNormaliser().batch(raws, LIMITS)
    assert got == slow_batch(raws, LIMITS)
    assert got.pings == len(got.keys) + sum(len(bad) for _, bad in got.rejected)
    assert FastNormaliser().batch([], LIMITS) == Normalised()


def test_dumps_each_is_dumps_of_each() -> None:
    pings = [
        {"unit_id": "a", "ts": "x", "lat": 1.0, "lon": 2.0, "source": s}
        for s in ["", "}", '},{"unit_id":"', "\n", '"}\n{"unit_id":"', "é😀", "\\", "\u2028"]
    ]
    assert _dumps_each(pings) == [orjson.dumps(p) for p in pings]
    assert _dumps_each([]) == []


def test_the_slow_rule_given_is_the_one_used() -> None:
    calls: list[bytes] = []

    def rule(raw: bytes, limits: Limits) -> tuple[list[Accepted], list[Rejected]]:
        calls.append(raw)
        return normalise_message(raw, limits)

    FastNormaliser(rule).batch([ping(""), b"[]", ping(',"lat":91'), ping("")], LIMITS)
    assert calls == [b"[]", ping(',"lat":91')]


# -- generated messages -------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)


def written(numbers: st.SearchStrategy[float]) -> st.SearchStrategy[str]:
    """Numbers as text, in the ways a gateway may write them: shortest repr, orjson's form,
    other precisions, fixed and exponent forms."""
    return st.one_of(
        numbers.map(repr),
        numbers.map(lambda x: orjson.dumps(x).decode()),
        numbers.map(lambda x: f"{x:.17g}"),
        numbers.map(lambda x: f"{x:.25e}"),
        numbers.map(lambda x: f"{x:.30f}"),
    )


def mostly(good: st.SearchStrategy[str], odd: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Nine times in ten a plausible value, so that most messages are whole pings."""
    return st.integers(0, 9).flatmap(lambda k: odd if k == 0 else good)


odd_number = st.one_of(
    written(finite),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(
        [
            "1e16",
            "-0.0",
            "-0",
            "0",
            "5e-324",
            "4.9e-324",
            "2.4e-324",
            "1e-400",
            "1e308",
            "1.7976931348623157e308",
            "1.8e308",
            "40",
            "40.0",
            "4e1",
            "0.4E+2",
            "40.000000000001",
            "90.0000000000000000001",
            "359.99999999999999999",
            "1E5",
            "1e+5",
            "-1e-300",
            "9007199254740993",
            "18446744073709551616",
            "01.5",
            "+1",
            ".5",
            "1.",
            "NaN",
            "-",
            "true",
            "null",
            '"40.7"',
        ]
    ),
)
lat = mostly(st.one_of(written(st.floats(-90, 90)), st.integers(-90, 90).map(str)), odd_number)
lon = mostly(st.one_of(written(st.floats(-180, 180)), st.integers(-180, 180).map(str)), odd_number)
positive = st.one_of(
    written(st.floats(0, 1e300)),
    written(st.floats(0, 1e-300)),
    st.integers(0, 10**30).map(str),
    st.sampled_from(["-0.0", "-0", "1e16", "5e-324", "1e-400", "9007199254740993", "null"]),
)
heading = st.one_of(written(st.floats(0, 360, exclude_max=True)), st.integers(0, 359).map(str))
fraction = st.integers(0, 9).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
offset = st.one_of(
    st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
    st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)).map(
        lambda t: f"{t[0]}{t[1]:02d}:{t[2]:02d}"
    ),
)
times = st.integers(NOW - 86_400_000, NOW + 120_000)
rfc3339 = st.tuples(times, fraction, offset, st.sampled_from("TTt")).map(
    lambda t: json.dumps(format_ts(t[0])[:19].replace("T", t[3]) + "." * bool(t[1]) + t[1] + t[2])
)
ts = mostly(
    st.one_of(times.map(lambda ms: json.dumps(format_ts(ms))), times.map(str), rfc3339),
    st.one_of(
        st.integers(-(2**63), 2**64).map(str),
        st.sampled_from(
            [
                '"2026-02-30T00:00:00Z"',
                '"2026-05-14T24:00:00Z"',
                '"2016-12-31T23:59:60Z"',
                '"0001-01-01T00:00:00.000Z"',
                '"9999-12-31T23:59:59.999Z"',
                '"0001-01-01T00:00:00+01:00"',
                '"2026-05-14 18:00:00Z"',
                '"2026-05-14T18:00:05"',
                '"2026-05-14T18:00:05.\\u0663\\u0663\\u0663Z"',
                "1778781605000.0",
                "true",
                "null",
                '"1778781605000"',
            ]
        ),
    ),
)
unit_id = mostly(
    st.text("ab09._:-XZ", min_size=1, max_size=4).map(json.dumps),
    st.one_of(
        st.text(max_size=70).map(json.dumps),
        st.integers(60, 70).map(lambda n: json.dumps("u" * n)),
        st.sampled_from(['""', '"u\\n"', "5", "null", '"car-1"', '"car\\u002d1"']),
    ),
)
source = mostly(
    st.one_of(
        st.text(max_size=20).map(lambda s: json.dumps(s, ensure_ascii=False)),
        st.text(max_size=20).map(json.dumps),
        st.just("null"),
    ),
    st.sampled_from(['"\\ud800"', '"\\udc00\\ud800"', '"a\x01"', '"}},{\\"unit_id\\":\\""', "5"]),
)
FIELDS = {
    "unit_id": unit_id,
    "ts": ts,
    "lat": lat,
    "lon": lon,
    "accuracy_m": mostly(positive, odd_number),
    "speed_mps": mostly(positive, odd_number),
    "heading_deg": mostly(heading, odd_number),
    "source": source,
}


@st.composite
def message(draw: st.DrawFn) -> bytes:
    """A JSON object of ping fields as text: usually all required ones, optional ones now and
    then, sometimes an unknown or repeated field, in any order, with a little whitespace."""
    names = ["unit_id", "ts", "lat", "lon"]
    names = [n for n in names if draw(st.integers(0, 30)) > 0]
    names += [
        n for n in ["accuracy_m", "speed_mps", "heading_deg", "source"] if draw(st.booleans())
    ]
    items = [(n, draw(FIELDS[n])) for n in names]
    if draw(st.integers(0, 10)) == 0:
        items.append((draw(st.sampled_from(["extra", "Lat", "lat", "ts"])), draw(odd_number)))
    items = draw(st.permutations(items))
    space = draw(st.sampled_from(["", " ", "\n"]))
    body = ("," + space).join(f'"{k}":{space}{v}' for k, v in items)
    raw = ("{" + space + body + space + "}").encode("utf-8", "surrogatepass")
    kind = draw(st.integers(0, 20))
    if kind == 0:
        return b"[" + raw + b"]"
    if kind == 1:
        return raw[: draw(st.integers(0, len(raw)))]
    return raw


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message(), st.integers(NOW - 60_000, NOW + 120_000))
def test_generated_messages_the_same_both_ways(raw: bytes, now_ms: int) -> None:
    got = fast_one(raw, Limits(now_ms))
    event("fast" if got is not None else "slow")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message(), max_size=30))
def test_generated_batches_the_same_both_ways(raws: list[bytes]) -> None:
    assert FastNormaliser().batch(raws, LIMITS) == slow_batch(raws, LIMITS)


def test_most_generated_good_pings_go_the_fast_way() -> None:
    """The property above is not vacuous: the fast path takes pings of every shape it meets."""
    import random

    rng = random.Random(7)
    raws = []
    for k in range(2000):
        p: dict[str, Any] = {
            "unit_id": f"car-{rng.randrange(300)}",
            "ts": rng.choice([format_ts(NOW - k), NOW - k, "2026-05-14T13:59:59.5-04:00"]),
            "lat": rng.choice([rng.uniform(-90, 90), rng.randrange(-90, 91)]),
            "lon": rng.uniform(-180, 180),
        }
        for name in ("accuracy_m", "speed_mps"):
            if rng.random() < 0.5:
                p[name] = rng.choice([None, rng.expovariate(0.1), 10 ** rng.randrange(30)])
        if rng.random() < 0.3:
            p["source"] = rng.choice(["avl", "é😀", '\n"}', None])
        raws.append(json.dumps(p).encode())  # orjson cannot write 10**29
    fast = FastNormaliser()
    assert all(fast.one(raw, LIMITS) is not None for raw in raws)
    assert fast.batch(raws, LIMITS) == slow_batch(raws, LIMITS)


def test_normalise_each_is_the_slow_path() -> None:
    raws = [raw for _, raw, _ in CASES]
    assert normalise_each(raws, LIMITS) == slow_batch(raws, LIMITS)


def test_a_failing_fast_path_falls_back_to_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the fast path costs time, not pings: the batch goes the slow way."""
    from services.ingest.service import IngestService, IngestSettings, _guarded_one

    service = IngestService(IngestSettings())

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the fast path")

    monkeypatch.setattr(service._normaliser, "batch", broken)
    monkeypatch.setattr(service._normaliser, "one", broken)
    raws = [raw for _, raw, _ in CASES]
    got = service._normalise(raws)
    assert got == slow_batch(raws, service._limits())  # CASES are months from the horizon
    assert _guarded_one(service._normaliser, ping(""), LIMITS) is None
