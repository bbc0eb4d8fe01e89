"""The `dosewatch` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dosewatch.replay import ReplayError, run_replay
from dosewatch.settings import ReplaySettings, read_config_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    handler = {
        "replay": _replay,
        "demo": _demo,
        "schemas": _schemas,
        "up": _up,
        "ingest": _service,
        "geofence": _service,
        "dosage": _service,
        "api": _service,
        "zones": _zones,
        "keys": _admin,
        "audit": _admin,
        "simulate": _simulate,
    }[args.command]
    try:
        return handler(args)
    except ReplayError as exc:
        print(f"dosewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dosewatch", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    replay = sub.add_parser("replay", help="recompute dosage from archived pings")
    replay.add_argument("--zones", type=Path, required=True, help="GeoJSON FeatureCollection")
    replay.add_argument("--pings", type=Path, required=True, help="JSON lines, one ping each")
    replay.add_argument("--out", type=Path, required=True, help="output directory")
    _add_rule_flags(replay)

    demo = sub.add_parser("demo", help="generate a seeded demo city and replay it")
    demo.add_argument("--out", type=Path, default=Path(".dosewatch/demo"))
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--zones", type=int, default=60, dest="n_zones")
    demo.add_argument("--units", type=int, default=25)
    demo.add_argument("--hours", type=float, default=8.0)
    _add_rule_flags(demo)

    up = sub.add_parser(
        "up",
        help="start the whole service (embedded broker and database "
        "unless DOSEWATCH_KAFKA_BOOTSTRAP / DOSEWATCH_DATABASE_URL are set)",
    )
    up.add_argument("--state-dir", type=Path, default=Path(".dosewatch"))
    up.add_argument("--demo", action="store_true", help="load a demo city and stream its patrols")
    up.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="demo patrols run this many times faster (dwell times shrink too)",
    )
    up.add_argument("--units", type=int, default=25, help="demo patrol units")
    up.add_argument("--demo-zones", type=int, default=60, dest="demo_zones")
    up.add_argument(
        "--processes",
        action="store_true",
        default=None,
        help="run each stage as a process of its own, as deployed, for machines with cores "
        "to spare (DOSEWATCH_STAGE_PROCESSES)",
    )
    for name, text in (("ingest", "validate raw AVL input (Kafka and HTTP)"),
                       ("geofence", "pings -> visit events, per unit"),
                       ("dosage", "visit events -> zone status, history, audit"),
                       ("api", "the dispatch API: REST and websockets")):  # fmt: skip
        sub.add_parser(name, help=text)
    zones = sub.add_parser("zones", help="manage zones in PostgreSQL")
    zones_sub = zones.add_subparsers(dest="zones_command", required=True)
    zimport = zones_sub.add_parser("import", help="validate and upsert a FeatureCollection")
    zimport.add_argument("file", type=Path)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kcreate = keys_sub.add_parser("create", help="a new key; its secret is printed once")
    kcreate.add_argument("--role", required=True, choices=["dispatcher", "mdt", "auditor", "admin"])
    kcreate.add_argument("--unit", help="the unit an mdt key is bound to")
    kcreate.add_argument("--label", default="", help="who or what holds it")
    keys_sub.add_parser("list", help="every key, without secrets")
    krevoke = keys_sub.add_parser("revoke", help="stop a key working (within seconds)")
    krevoke.add_argument("key_id")
    audit = sub.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="recompute the hash chain; exit 1 if it is broken")

    sim = sub.add_parser(
        "simulate",
        help="seeded patrol units on a demo city, as live AVL input to Kafka (the raw topic, "
        "DOSEWATCH_ settings) or the HTTP intake",
    )
    sim.add_argument("--units", type=int, default=25)
    sim.add_argument("--zones", type=int, default=60, dest="n_zones", help="demo city hot spots")
    sim.add_argument("--seed", type=int, default=7, help="the city and the patrols")
    sim.add_argument("--rate", type=float, default=20.0, help="pings per second overall")
    sim.add_argument("--interval", type=float, help="each unit's report interval (over --rate)")
    sim.add_argument("--speed", type=float, default=1.0, help="time multiplier: stops shrink too")
    sim.add_argument("--duration", type=float, help="stop after this many seconds (default: ^C)")
    sim.add_argument("--http", metavar="URL", help="POST to the ingest HTTP intake instead")
    sim.add_argument(
        "--import-zones", action="store_true", help="upsert the city's zones into PostgreSQL first"
    )

    schemas = sub.add_parser("schemas", help="write the wire contracts as JSON Schema")
    schemas.add_argument("--out", type=Path, default=None, help="directory (default: schemas/json)")
    return parser


def _add_rule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tz", help="agency IANA timezone, e.g. America/New_York (default UTC)")
    p.add_argument("--shifts", help="local shift start times, e.g. 07:00,15:00,23:00")
    p.add_argument("--config", type=Path, help="TOML or JSON file of settings")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="pings per core batch")


def settings_from(args: argparse.Namespace) -> ReplaySettings:
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values.update(read_config_file(args.config))
        except OSError as exc:
            raise ReplayError(f"cannot read config {args.config}: {exc.strerror}") from None
        except ValueError as exc:
            raise ReplayError(f"config {args.config} is not valid: {exc}") from None
    for key in ("tz", "shifts", "batch_size"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    try:
        return ReplaySettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        )
        raise ReplayError(f"invalid settings: {problems}") from None


def _replay(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    for label, path in (("--zones", args.zones), ("--pings", args.pings)):
        if not path.is_file():
            raise ReplayError(f"{label} {path}: no such file")
    summary = run_replay(args.zones, args.pings, args.out, settings)
    print(summary.text())
    print(f"  wrote {args.out}/visits.jsonl, zone_periods.jsonl, events.jsonl, rejected.jsonl")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dosewatch.demo import write_demo_city

    settings = settings_from(args)
    zones_path, pings_path = write_demo_city(
        args.out, seed=args.seed, zones=args.n_zones, units=args.units, hours=args.hours
    )
    print(f"demo city (seed {args.seed}): {zones_path}, {pings_path}")
    summary = run_replay(zones_path, pings_path, args.out / "replay", settings)
    print(summary.text())
    print(f"  wrote {args.out}/replay/")
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from schemas.export import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return 0


def _up(args: argparse.Namespace) -> int:
    from dosewatch.up import up
    from services.common import logs
    from services.common.embedded import EmbeddedError

    logs.configure("up")
    try:
        asyncio.run(up(args.state_dir, args.demo, args.speed, args.units, args.demo_zones,
                       args.processes))  # fmt: skip
    except EmbeddedError as e:
        print(f"dosewatch up: {e}", file=sys.stderr)
        return 1
    return 0


def _service(args: argparse.Namespace) -> int:
    from services.common import logs

    logs.configure(args.command)
    if args.command == "ingest":
        from services.ingest.service import main as run_ingest

        asyncio.run(run_ingest())
    elif args.command == "geofence":
        from services.geofence.service import main as run_geofence

        asyncio.run(run_geofence())
    elif args.command == "dosage":
        from services.dosage.service import main as run_dosage

        asyncio.run(run_dosage())
    else:
        from services.api.service import main as run_api

        asyncio.run(run_api())
    return 0


def _admin(args: argparse.Namespace) -> int:
    from dosewatch.admin import run

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    import signal

    from dosewatch.demo import make_zones
    from dosewatch.simulate import SimStats, SimulateError, import_city, stream
    from services.common.settings import CommonSettings

    settings = CommonSettings()
    features = make_zones(args.seed, args.n_zones)

    async def run() -> SimStats:
        if args.import_zones:
            print(f"{await import_city(settings, features)} zones written", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly and still print the summary
            loop.add_signal_handler(sig, stop.set)
        return await stream(settings, features, seed=args.seed, units=args.units,
                            rate=args.rate, interval_s=args.interval, speed=args.speed,
                            duration_s=args.duration, http_url=args.http,
                            stop_event=stop)  # fmt: skip

    try:
        stats = asyncio.run(run())
    except SimulateError as exc:
        print(f"dosewatch simulate: error: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    return 0


def _zones(args: argparse.Namespace) -> int:
    import asyncpg
    import orjson

    from services.common import db
    from services.common.settings import CommonSettings
    from services.common.zonestore import import_zones

    async def run() -> int:
        url = CommonSettings().database_url.get_secret_value()
        try:
            doc = orjson.loads(args.file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ReplayError(f"cannot read {args.file}: {exc}") from None
        await db.ensure_database(url)
        conn = await asyncpg.connect(url)
        try:
            await db.migrate(conn)
            written, errors = await import_zones(conn, doc)
        finally:
            await conn.close()
        if errors:
            raise ReplayError("invalid zones, nothing written:\n  " + "\n  ".join(errors))
        print(f"{written} zones written")
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
