"""`dosewatch keys …` and `dosewatch audit verify`: operator commands on PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json

import asyncpg

from dosewatch.replay import ReplayError
from services.api import keys
from services.api.audit import verify_chain
from services.api.settings import ApiSettings
from services.common import db


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    settings = ApiSettings()
    url = settings.database_url.get_secret_value()
    await db.ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        if args.command == "audit":
            return await _verify(conn)
        return await _keys(conn, args, settings)
    finally:
        await conn.close()


async def _keys(conn: asyncpg.Connection, args: argparse.Namespace, s: ApiSettings) -> int:
    actor = f"cli:{getpass.getuser()}"
    try:
        if args.keys_command == "create":
            token, record = await keys.create_key(
                conn, args.role, args.unit, args.label, actor, s.source
            )
            print(json.dumps(record.public()))
            print(f"key (shown once, store it now): {token}")
        elif args.keys_command == "list":
            for record in await keys.list_keys(conn):
                print(json.dumps(record.public()))
        else:
            record = await keys.revoke_key(conn, args.key_id, actor, s.source)
            print(json.dumps(record.public()))
    except keys.KeyError_ as exc:
        raise ReplayError(str(exc)) from None
    return 0


async def _verify(conn: asyncpg.Connection) -> int:
    report = await verify_chain(conn)
    if report.ok:
        print(f"audit chain intact: {report.rows} rows, last seq {report.last_seq}, "
              f"head {report.last_hash}")  # fmt: skip
        return 0
    print(f"audit chain BROKEN at seq {report.bad_seq}: {report.error}")
    return 1
