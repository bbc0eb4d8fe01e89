"""API keys and JWTs against a real PostgreSQL: the `dosewatch keys` commands, revocation,
audit of key operations, and bearer JWTs mapped to roles."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import asyncpg
import jwt
import pytest

from services.api.auth import Authenticator, AuthError
from services.api.settings import ApiSettings
from services.common import db


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DOSEWATCH_DATABASE_URL=database_url)
    return subprocess.run([sys.executable, "-m", "dosewatch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_keys_commands_create_list_revoke_and_audit(database_url: str) -> None:
    made = cli(database_url, "keys", "create", "--role", "mdt", "--unit", "car-12",
               "--label", "car 12 MDT")  # fmt: skip
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout.splitlines()[0])
    token = made.stdout.splitlines()[1].rsplit(" ", 1)[1]
    assert record["role"] == "mdt" and record["unit_id"] == "car-12"
    assert token.startswith(f"dw_{record['key_id']}_")

    listed = [json.loads(line) for line in cli(database_url, "keys", "list").stdout.splitlines()]
    assert [k["key_id"] for k in listed] == [record["key_id"]]
    assert all("secret" not in k and token not in json.dumps(k) for k in listed)

    bad = cli(database_url, "keys", "create", "--role", "mdt")
    assert bad.returncode == 2 and "--unit" in bad.stderr

    settings = ApiSettings(database_url=database_url, key_cache_s=0)

    async def check() -> None:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            auth = Authenticator(settings, pool)
            principal = await auth.authenticate(token)
            assert (principal.role, principal.unit_id) == ("mdt", "car-12")
            with pytest.raises(AuthError) as wrong:
                await auth.authenticate(token[:-2] + "xx")
            assert wrong.value.status == 401
            revoked = cli(database_url, "keys", "revoke", record["key_id"])
            assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_at"]
            with pytest.raises(AuthError):
                await auth.authenticate(token)
            async with pool.acquire() as conn:
                rows = await conn.fetch("SELECT type, subject, actor FROM audit_log ORDER BY seq")
            assert [(r["type"], r["subject"]) for r in rows] == [
                ("dosewatch.key.created", record["key_id"]),
                ("dosewatch.key.revoked", record["key_id"]),
            ]
            assert all(r["actor"].startswith("cli:") for r in rows)
        finally:
            await pool.close()

    asyncio.run(check())
    verify = cli(database_url, "audit", "verify")
    assert verify.returncode == 0 and "intact: 2 rows" in verify.stdout


@pytest.mark.parametrize(
    ("claims", "expect"),
    [
        ({"role": "dispatcher"}, ("dispatcher", None)),
        ({"role": "dispatcher", "unit_id": "car-1"}, ("dispatcher", None)),  # unit ignored
        ({"role": "mdt", "unit_id": "car-3"}, ("mdt", "car-3")),
        ({"role": "mdt"}, None),  # an MDT token must name its unit
        ({"role": "superuser"}, None),
        ({"role": "mdt", "unit_id": 7}, None),  # a unit must be a string
        ({"role": "auditor", "exp": 1}, None),  # expired
    ],
)
def test_jwt_roles(database_url: str, claims: dict[str, object], expect: object) -> None:
    secret = "s" * 32
    settings = ApiSettings(database_url=database_url, jwt_secret=secret)
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60} | claims, secret, "HS256")

    async def check() -> None:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        async with pool.acquire() as conn:
            await db.migrate(conn)
        try:
            auth = Authenticator(settings, pool)
            if expect is None:
                with pytest.raises(AuthError):
                    await auth.authenticate(token)
            else:
                p = await auth.authenticate(token)
                assert (p.role, p.unit_id) == expect and p.subject == "alice"
            forged = jwt.encode({"sub": "x", "role": "admin", "exp": int(time.time()) + 60},
                                "another secret of 32 bytes long!", "HS256")  # fmt: skip
            with pytest.raises(AuthError):
                await auth.authenticate(forged)
        finally:
            await pool.close()

    asyncio.run(check())
