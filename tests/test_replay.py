"""`dosewatch replay` end to end: the evening-shift sample exactly, outputs, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from dosewatch.cli import main
from schemas.records import CloudEvent, RejectedPing, VisitRecord, ZonePeriodRecord, ZoneStatus

SAMPLE = Path(__file__).parent / "data" / "evening-shift"
SAMPLE_ARGS = ["--tz", "America/New_York", "--shifts", "07:00,15:00,23:00"]


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(tmp: Path, zones: Path, pings: Path, *extra: str) -> int:
    return main(["replay", "--zones", str(zones), "--pings", str(pings), "--out", str(tmp), *extra])


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    assert replay(out, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *SAMPLE_ARGS) == 0
    return out


def test_sample_visits_reproduced_exactly(sample_out: Path) -> None:
    assert rows(sample_out / "visits.jsonl") == rows(SAMPLE / "expected" / "visits.jsonl")


def test_sample_zone_periods_reproduced_exactly(sample_out: Path) -> None:
    got = rows(sample_out / "zone_periods.jsonl")
    assert got == rows(SAMPLE / "expected" / "zone_periods.jsonl")


@pytest.mark.parametrize("batch", ["1", "37", "100000"])
def test_sample_is_independent_of_batch_size(sample_out: Path, tmp_path: Path, batch: str) -> None:
    replay(
        tmp_path,
        SAMPLE / "zones.geojson",
        SAMPLE / "pings.jsonl",
        *SAMPLE_ARGS,
        "--batch-size",
        batch,
    )
    for name in ("visits.jsonl", "zone_periods.jsonl", "events.jsonl"):
        assert (tmp_path / name).read_bytes() == (sample_out / name).read_bytes(), name


def test_outputs_match_their_contracts(sample_out: Path) -> None:
    events = rows(sample_out / "events.jsonl")
    for row in rows(sample_out / "visits.jsonl"):
        VisitRecord.model_validate(row)
    for row in rows(sample_out / "zone_periods.jsonl"):
        ZonePeriodRecord.model_validate(row)
    for e in events:
        CloudEvent.model_validate(e)
        if e["type"] == "dosewatch.zone.status_changed":
            ZoneStatus.model_validate(e["data"])
    assert len({e["id"] for e in events}) == len(events)


def test_visit_ended_events_carry_the_visit_rows(sample_out: Path) -> None:
    events = rows(sample_out / "events.jsonl")
    ended = [e["data"] for e in events if e["type"] == "dosewatch.visit.ended"]
    key = lambda r: (r["started_at"], r["unit_id"], r["zone_id"])  # noqa: E731
    assert sorted(ended, key=key) == rows(sample_out / "visits.jsonl")
    started = [e for e in events if e["type"] == "dosewatch.visit.started"]
    assert len(started) == len(ended)
    met = {
        (e["data"]["unit_id"], e["data"]["started_at"])
        for e in events
        if e["type"] == "dosewatch.visit.target_met"
    }
    assert met == {(r["unit_id"], r["started_at"]) for r in ended if r["target_met"]}


def test_status_changes_follow_the_zone(sample_out: Path) -> None:
    last: dict[str, str] = {}
    seen: set[str] = set()
    times: list[str] = []
    for e in rows(sample_out / "events.jsonl"):
        if e["type"] != "dosewatch.zone.status_changed":
            continue
        times.append(e["time"])
        data = e["data"]
        assert data["previous_status"] == last.get(e["subject"], "due")
        assert data["status"] != data["previous_status"]
        if data["status"] in ("active", "met", "overstay"):
            assert data["units_present"]
        last[e["subject"]] = data["status"]
        seen.add(data["status"])
    assert {"active", "met", "overstay", "satisfied", "due"} <= seen
    assert times == sorted(times)  # time-driven changes are reported as the clock passes them


def test_summary_is_printed(
    sample_out: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    replay(tmp_path, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *SAMPLE_ARGS)
    text = capsys.readouterr().out
    assert "replayed 14698 pings" in text and "visits 323" in text and "duplicate 141" in text


def test_invalid_pings_reported_with_line_numbers(tmp_path: Path) -> None:
    good = {"unit_id": "u1", "ts": "2026-05-14T18:00:00Z", "lat": 40.7, "lon": -74.0}
    lines = [
        orjson.dumps(good),
        b"{not json",
        b"",
        orjson.dumps(good | {"ts": "2026-05-14T18:00:05"}),
        orjson.dumps([good | {"ts": 1778781610000}, good | {"lat": 91}]),
        b"\xff\xfe",
        orjson.dumps(good | {"ts": "2026-05-14T18:00:20Z"}),
    ]
    pings = tmp_path / "p.jsonl"
    pings.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert replay(out, SAMPLE / "zones.geojson", pings) == 0
    rejected = rows(out / "rejected.jsonl")
    for r in rejected:
        RejectedPing.model_validate(r)
    assert [(r["line"], r.get("index")) for r in rejected] == [
        (2, None),
        (4, None),
        (5, 1),
        (6, None),
    ]
    assert rejected[0]["errors"][0]["reason"].startswith("invalid JSON")
    assert rejected[1]["errors"][0]["field"] == "ts"
    assert rejected[2]["errors"][0]["field"] == "lat" and '"lat":91' in rejected[2]["raw"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tz", "Mars/Olympus"], "unknown IANA timezone"),
        (["--shifts", "7am"], "not HH:MM"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert replay(tmp_path, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *args) == 2
    assert message in capsys.readouterr().err


def test_missing_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay(tmp_path / "o", tmp_path / "nope.geojson", SAMPLE / "pings.jsonl") == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "id": "A"}]}')
    assert replay(tmp_path / "o", bad, SAMPLE / "pings.jsonl") == 2
    assert "feature 0 (A): geometry" in capsys.readouterr().err
    bad.write_text("{")
    assert replay(tmp_path / "o", bad, SAMPLE / "pings.jsonl") == 2
    assert "not valid JSON" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert replay(blocker, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl") == 2
    assert "not a directory" in capsys.readouterr().err


def test_config_file_sets_rules(tmp_path: Path) -> None:
    config = tmp_path / "agency.toml"
    config.write_text(
        'tz = "America/New_York"\nshifts = "07:00,15:00,23:00"\n[dosage]\nmin_visit_s = 0\n'
    )
    out = tmp_path / "out"
    config_args = ["--config", str(config)]
    assert replay(out, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *config_args) == 0
    visits = rows(out / "visits.jsonl")
    overridden = {"Z000", "Z001", "Z004", "Z006"}  # zones with their own min_visit_s
    assert len(visits) == 323
    assert all(v["qualified"] for v in visits if v["zone_id"] not in overridden)
    config.write_text("[dosage]\nexit_buffer_metres = 3\n")  # a misspelt key is refused
    assert replay(out, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *config_args) == 2


def test_env_sets_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOSEWATCH_DOSAGE__MIN_VISIT_S", "0")
    assert replay(tmp_path, SAMPLE / "zones.geojson", SAMPLE / "pings.jsonl", *SAMPLE_ARGS) == 0
    visits = rows(tmp_path / "visits.jsonl")
    # zones that override min_visit_s keep their own; the rest now count every visit
    assert any(v["duration_s"] < 120 and v["qualified"] and v["zone_id"] == "Z002" for v in visits)


def test_demo_city_replays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--zones", "20", "--units", "5", "--hours", "1"]) == 0
    assert (out / "replay" / "visits.jsonl").stat().st_size > 0
    assert "replayed" in capsys.readouterr().out
    again = tmp_path / "demo2"
    main(["demo", "--out", str(again), "--zones", "20", "--units", "5", "--hours", "1"])
    assert (again / "pings.jsonl").read_bytes() == (out / "pings.jsonl").read_bytes()
    shutil.rmtree(again)


def test_board_ignores_repeated_visit_events() -> None:
    """At-least-once delivery upstream: a repeated or regressing event changes nothing."""
    from dosewatch.replay import decode_lines, load_zones
    from dosewatch.settings import ReplaySettings
    from services.dosage.core.board import ZoneBoard
    from services.dosage.core.params import DosageParams
    from services.dosage.core.tracker import Fix, VisitTracker
    from services.geofence.core.index import ZoneIndex

    index = ZoneIndex(load_zones(SAMPLE / "zones.geojson"), DosageParams())
    lines = enumerate((SAMPLE / "pings.jsonl").read_bytes().splitlines(), start=1)
    fixes: list[Fix] = [f for f, _ in decode_lines(lines) if f is not None]
    tracker = VisitTracker(index, DosageParams())
    events = tracker.process(fixes[:6000])
    rules = {z: index.rules_by_id[z] for z in index.zone_ids}
    calendar = ReplaySettings(tz="America/New_York").calendar()
    once, twice = (
        ZoneBoard(rules, DosageParams(), calendar),
        ZoneBoard(rules, DosageParams(), calendar),
    )
    a = [c for e in events for c in once.apply(e)]
    b = [c for e in events + events[: len(events) // 2] for c in twice.apply(e)]
    b += [c for e in events[len(events) // 3 :] for c in twice.apply(e)]
    assert a and a == b
    assert {z: once.snapshot(z) for z in rules} == {z: twice.snapshot(z) for z in rules}
