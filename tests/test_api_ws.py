"""The websocket endpoints through real connections, against the API wired to the real
pipeline: zone status (snapshot, deltas, filters, resume, slow consumers) and the audit log.

Statuses are also applied straight to the API's StatusBook (and ctx.changed set), which is
what the Kafka feed does: that drives many changes fast without a broker round trip each."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from schemas.timefmt import format_ts
from services.api import keys, ws
from services.api.audit import append_event
from services.api.context import ApiContext
from services.api.core.frames import (
    FrameError,
    ResumeFrom,
    TickFrames,
    View,
    delta_entries,
    delta_frame,
    heartbeat_frame,
    parse_client_message,
    parse_seq,
    parse_since,
    snapshot_frame,
)
from services.api.core.statusbook import StatusBook
from tests.api_helpers import MDT_UNIT, Stack, api_stack, ping, wait_until

INSIDE_Z000 = (-73.99308646946923, 40.71047563789939)
Frame = dict[str, Any]


def _open(st: Stack, path: str, role: str | None = "dispatcher", **kw: Any) -> connect:
    headers = st.headers(role) if role else None
    return connect(f"{st.ws}{path}", additional_headers=headers, compression=None, proxy=None,
                   max_size=None, **kw)  # fmt: skip


async def _recv(c: ClientConnection) -> Frame:
    async with asyncio.timeout(30):
        frame: Frame = orjson.loads(await c.recv(decode=False))
    return frame


async def _until(c: ClientConnection, want: Callable[[Frame], bool]) -> list[Frame]:
    """Frames up to and including the first one `want` accepts."""
    got = [await _recv(c)]
    while not want(got[-1]):
        got.append(await _recv(c))
    return got


async def _close_code(st: Stack, path: str, role: str | None = None, **kw: Any) -> int | None:
    async with _open(st, path, role, **kw) as c:
        with pytest.raises(ConnectionClosed):
            await _recv(c)
        return c.close_code


class Driver:
    """Status changes applied to the API's book as the Kafka feed would apply them."""

    def __init__(self, st: Stack) -> None:
        assert st.api.ctx is not None
        self.ctx: ApiContext = st.api.ctx
        self.book: StatusBook = self.ctx.book
        self.at = int(time.time() * 1000)
        self.applied = 0

    def change(self, zone_id: str, **extra: Any) -> None:
        self.at += 1
        status = dict(self.book.zones[zone_id], as_of=format_ts(self.at), **extra)
        assert self.book.apply(status) is not None
        self.applied += 1
        self.ctx.changed.set()

    def zone_ids(self) -> list[str]:
        return sorted(self.book.zones)


async def _ticked(hub: ws.ZoneHub, book: StatusBook) -> None:
    """Until the hub has run a tick that saw every change applied so far."""

    async def caught_up() -> bool:
        return hub.tick_seq == book.seq

    await wait_until(caught_up, every_s=0.01)


def _the_client(hub: ws.ZoneHub, exclude: set[ws.ZoneClient] | None = None) -> ws.ZoneClient:
    clients = hub.clients - (exclude or set())
    assert len(clients) == 1
    return next(iter(clients))


# -- pure helpers -------------------------------------------------------------------------------


def test_client_messages_are_checked() -> None:
    req = parse_client_message('{"type":"filter","status":"due","bbox":[-74,40.7,-73.9,40.8]}')
    assert req.statuses == ["due"] and req.bbox == "-74,40.7,-73.9,40.8" and req.district is None
    for bad, says in [
        ("nope", "not JSON"),
        ("[1]", "JSON object"),
        ('{"type":"subscribe"}', "unknown message type"),
        ('{"type":"filter","colour":"red"}', "unknown filter fields"),
        ('{"type":"filter","status":[1]}', "status"),
        ('{"type":"filter","bbox":{"w":1}}', "bbox"),
        ('{"type":"filter","district":7}', "district"),
        ("x" * 5000, "over"),
    ]:
        with pytest.raises(FrameError, match=says):
            parse_client_message(bad)
    assert parse_seq(None, "since") is None and parse_seq("42", "since") == 42


def test_sequence_numbers_from_the_url_are_checked() -> None:
    assert parse_seq(None, "after") is None and parse_seq("", "after") is None
    assert parse_seq("42", "after") == 42
    # Digits to str.isdigit() that int() refuses (superscripts) or reads (other scripts).
    for bad in ("-1", "1.5", "abc", "9" * 30, "\u00b2", "1\u00b2", "\u0663", "\uff11", " 1"):
        with pytest.raises(FrameError, match="after"):
            parse_seq(bad, "after")
    assert parse_since(None) is None and parse_since("") is None
    assert parse_since("feedf00d:42") == ResumeFrom("feedf00d", 42)
    assert parse_since("7") == ResumeFrom(None, 7)  # a bare seq: numbering unknown
    for bad in ("feedf00d:", ":42", "feedf00d:x", "feed f00d:1", "a:b:1", "\u00b2", "e:\u00b2",
                "\u00e9:1", "e" * 65 + ":1", "feedf00d:-1"):  # fmt: skip
        with pytest.raises(FrameError, match="since"):
            parse_since(bad)


def test_frames_with_a_seq_carry_the_epoch_it_is_numbered_in() -> None:
    book = StatusBook(epoch="feedf00d")
    book.apply({"zone_id": "A", "status": "due", "as_of": "2026-11-22T10:00:00.000Z"})
    snap = orjson.loads(snapshot_frame(book.snapshot(), View()))
    assert (snap["type"], snap["epoch"], snap["seq"]) == ("snapshot", "feedf00d", 1)
    changes = book.changes_since(0)
    assert changes is not None
    delta = orjson.loads(delta_frame(changes, View()) or "")
    assert (delta["type"], delta["epoch"], delta["seq"]) == ("delta", "feedf00d", 1)
    assert orjson.loads(heartbeat_frame(1, "feedf00d")) == {"type": "heartbeat", "seq": 1,
                                                            "epoch": "feedf00d"}  # fmt: skip
    assert orjson.loads(heartbeat_frame(9)) == {"type": "heartbeat", "seq": 9}  # audit


def test_status_filtered_deltas_announce_zones_that_leave_the_filter() -> None:
    changed: list[dict[str, Any]] = [
        {"zone_id": "A", "status": "due"},
        {"zone_id": "B", "status": "active"},
        {"zone_id": "C", "deleted": True},
    ]
    assert delta_entries(changed, View()) == changed
    assert delta_entries(changed, View(statuses=("due",))) == [
        {"zone_id": "A", "status": "due"},
        {"zone_id": "B", "excluded": True},
        {"zone_id": "C", "deleted": True},
    ]


def test_a_tick_encodes_each_distinct_frame_once() -> None:
    frames = TickFrames()
    builds: list[int] = []

    def build() -> str:
        builds.append(1)
        return "frame"

    assert [frames.get(("delta", 3, ()), build) for _ in range(1000)] == ["frame"] * 1000
    assert len(builds) == 1 and frames.encoded == 1


def test_a_send_runs_in_the_caller_until_it_must_wait() -> None:
    async def scenario() -> list[str]:
        log: list[str] = []
        writable = asyncio.Event()

        async def send(name: str) -> None:
            log.append(f"{name} started")
            await writable.wait()
            log.append(f"{name} written")

        writable.set()
        assert ws._start(send("now")) is None  # done before _start returned: no task
        assert log == ["now started", "now written"]
        writable.clear()
        later = ws._start(send("later"))
        assert later is not None and log[-1] == "later started"
        writable.set()
        await later
        assert log[-1] == "later written"
        writable.clear()
        stuck = ws._start(send("stuck"))
        assert stuck is not None
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert not writable._waiters  # it unwound

        async def fails() -> None:
            raise OSError("gone")

        failed = ws._start(fails())
        assert failed is not None and isinstance(failed.exception(), OSError)
        return log

    assert asyncio.run(scenario()) == [
        "now started", "now written", "later started", "later written", "stuck started"
    ]  # fmt: skip


# -- /v1/ws/zones -------------------------------------------------------------------------------


async def _ping_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix) as st,
        _open(st, "/v1/ws/zones") as c,
    ):
        snap = await _recv(c)
        assert snap["type"] == "snapshot" and len(snap["zones"]) == 12
        assert {z["zone_id"]: z["status"] for z in snap["zones"]}["Z000"] == "due"

        await st.send_pings([ping(MDT_UNIT, *INSIDE_Z000)])

        def z000_active(f: Frame) -> bool:
            return f["type"] == "delta" and any(
                z["zone_id"] == "Z000" and z.get("status") == "active" for z in f["zones"]
            )

        frames = await _until(c, z000_active)
        deltas = [f for f in frames if f["type"] == "delta"]
        seqs = [snap["seq"]] + [f["seq"] for f in deltas]
        assert seqs == sorted(set(seqs)), seqs  # strictly increasing
        z000 = [z for z in deltas[-1]["zones"] if z["zone_id"] == "Z000"]
        assert z000[0]["units_present"] == [MDT_UNIT]

        # A filter gets a fresh snapshot under it.
        await c.send(orjson.dumps({"type": "filter", "status": ["active"]}).decode())
        snap = (await _until(c, lambda f: f["type"] == "snapshot"))[-1]
        assert [z["zone_id"] for z in snap["zones"]] == ["Z000"]
        assert snap["filter"]["status"] == ["active"]

        # Malformed messages: an error frame each, and the stream goes on.
        for bad, says in [
            ("{not json", "not JSON"),
            ('{"type":"filter","bbox":"1,2,3"}', "bbox"),
            ('{"type":"filter","status":["sleepy"]}', "unknown status"),
        ]:
            await c.send(bad)
            err = (await _until(c, lambda f: f["type"] != "heartbeat"))[-1]
            assert err["type"] == "error" and says in err["detail"], err
        # The same filters as the REST endpoint.
        w, s = INSIDE_Z000[0] - 0.0005, INSIDE_Z000[1] - 0.0005
        bbox = [w, s, w + 0.001, s + 0.001]
        await c.send(orjson.dumps({"type": "filter", "bbox": bbox}).decode())
        snap = (await _until(c, lambda f: f["type"] == "snapshot"))[-1]
        async with httpx.AsyncClient(base_url=st.base) as http:
            r = await http.get("/v1/zones/status", params={"bbox": ",".join(map(str, bbox))},
                               headers=st.headers("dispatcher"))  # fmt: skip
        assert "Z000" in [z["zone_id"] for z in snap["zones"]]
        assert snap["zones"] == r.json()["zones"] and len(snap["zones"]) < 12


def test_ping_reaches_a_zones_client_as_a_delta_after_its_snapshot(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_ping_scenario(kafka_bootstrap, database_url, topic_prefix))


async def _auth_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with api_stack(kafka_bootstrap, database_url, topic_prefix) as st:
        assert await _close_code(st, "/v1/ws/zones") == 4401
        assert await _close_code(st, "/v1/ws/zones?token=dw_nope_nope") == 4401
        assert await _close_code(st, "/v1/ws/zones", "mdt") == 4403
        assert await _close_code(st, "/v1/ws/zones", "auditor") == 4403
        assert await _close_code(st, "/v1/ws/audit", "dispatcher") == 4403
        assert await _close_code(st, "/v1/ws/audit") == 4401
        assert await _close_code(st, "/v1/ws/zones?since=yesterday", "dispatcher") == 4400
        # Parse errors of every kind are a 4400, never a handler failure (1011).
        for bad in ("%C2%B2", "feedf00d:%C2%B2", "feedf00d:", "%C3%A9:1"):
            assert await _close_code(st, f"/v1/ws/zones?since={bad}", "dispatcher") == 4400
        assert await _close_code(st, "/v1/ws/audit?after=%C2%B2", "auditor") == 4400
        # Every way of presenting a credential: header, X-API-Key, ?token= (browsers).
        key = {"X-API-Key": st.tokens["dispatcher"]}
        async with connect(f"{st.ws}/v1/ws/zones", additional_headers=key, proxy=None) as c:
            assert (await _recv(c))["type"] == "snapshot"
        async with _open(st, f"/v1/ws/zones?token={st.tokens['admin']}", None) as c:
            assert (await _recv(c))["type"] == "snapshot"
        # max_queue=None: unread rows must not pause the client's reads (and its close).
        path = f"/v1/ws/audit?token={st.tokens['auditor']}"
        async with _open(st, path, None, max_queue=None) as c:
            assert (await _recv(c))["type"] == "audit"


def test_websockets_refuse_missing_credentials_and_other_roles(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_auth_scenario(kafka_bootstrap, database_url, topic_prefix))


def _small_receive_buffer(port: int) -> socket.socket:
    # A fixed receive window (no autotuning up to tcp_rmem's max, often 32 MB) fills the TCP
    # buffers between server and client in a few ticks; much smaller makes loopback crawl.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _slow_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with api_stack(kafka_bootstrap, database_url, topic_prefix) as st:
        assert st.api.http is not None
        drive = Driver(st)
        zones = drive.zone_ids()
        pad = "x" * 32_768  # big statuses: the buffers fill in a few ticks
        # max_queue=1: the client library stops reading off the socket once a frame waits.
        async with _open(st, "/v1/ws/zones", max_queue=1,
                         sock=_small_receive_buffer(st.api.http.port)) as slow:  # fmt: skip
            first = await _recv(slow)
            assert first["type"] == "snapshot"
            hub = ws.zone_hub(drive.ctx)
            assert hub is not None
            client = _the_client(hub)

            rounds = 0

            async def round_of_changes() -> None:
                nonlocal rounds
                rounds += 1
                for z in zones:
                    drive.change(z, pad=pad, round=rounds)
                await _ticked(hub, drive.book)
                # Bounded whatever the client does: one frame in flight, no queue.
                assert client.queued <= 1 and len(client.errors) == 0

            while client.skipped < 3:  # its frame has stopped going out: it is being skipped
                await round_of_changes()
                assert rounds < 300, "the client's buffers never filled"
            handed = client.frames
            for _ in range(10):
                await round_of_changes()
            assert client.frames == handed  # nothing more was handed over while it is stuck
            assert client.skipped >= 10

            # Reading again: it catches up to the latest state of every zone, conflated.
            got = await _until(slow, lambda f: f["seq"] == drive.book.seq)
            last = got[-1]
            assert last["type"] == "delta" and last["conflated"] is True
            assert {z["zone_id"]: z["round"] for z in last["zones"]} == dict.fromkeys(zones, rounds)
            assert last["zones"] == [drive.book.zones[z["zone_id"]] for z in last["zones"]]
            assert len(got) < rounds  # far fewer frames than rounds of changes
            assert drive.applied == rounds * len(zones)


def test_a_slow_client_is_conflated_not_queued(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_slow_scenario(kafka_bootstrap, database_url, topic_prefix))


def _slow_closed() -> float:
    # The API runs in this process: its metrics are in this registry.
    value = REGISTRY.get_sample_value("dosewatch_ws_slow_closed_total", {"endpoint": "zones"})
    return value or 0.0


async def _stuck_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with (
        api_stack(kafka_bootstrap, database_url, topic_prefix, send_timeout_s=1.0) as st,
        httpx.AsyncClient(base_url=st.base, timeout=10) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        assert st.api.http is not None
        drive = Driver(st)
        zones = drive.zone_ids()
        pad = "x" * 32_768
        closed_before = _slow_closed()
        async with _open(st, "/v1/ws/zones") as healthy:
            await _recv(healthy)
            hub = ws.zone_hub(drive.ctx)
            assert hub is not None
            fine = _the_client(hub)
            received: list[Frame] = []

            async def keep_reading() -> None:
                while True:
                    received.append(await _recv(healthy))

            reader = asyncio.create_task(keep_reading())
            stack.callback(reader.cancel)
            async with _open(st, "/v1/ws/zones", max_queue=1,
                             sock=_small_receive_buffer(st.api.http.port)) as stuck:  # fmt: skip
                await _recv(stuck)
                client = _the_client(hub, {fine})
                rounds = 0
                while not client.dropped:
                    rounds += 1
                    for z in zones:
                        drive.change(z, pad=pad, round=rounds)
                    await _ticked(hub, drive.book)
                    assert rounds < 2000, "the stuck client was never closed"
                assert client not in hub.clients and fine in hub.clients

                # The healthy console was never held back and is current.
                async def current() -> bool:
                    return bool(received) and received[-1]["seq"] == drive.book.seq

                await wait_until(current)
                assert {z["round"] for z in received[-1]["zones"]} == {rounds}

                async def one_client_left() -> bool:
                    text = (await http.get("/metrics")).text
                    return 'dosewatch_ws_clients{endpoint="zones"} 1.0' in text

                await wait_until(one_client_left)
                assert _slow_closed() == closed_before + 1

                # What was already in its buffers can still be read; then the stream ends.
                with pytest.raises(ConnectionClosed):
                    while True:
                        await _recv(stuck)


def test_a_client_stuck_over_the_send_timeout_is_closed(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_stuck_scenario(kafka_bootstrap, database_url, topic_prefix))


async def _resume_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with api_stack(kafka_bootstrap, database_url, topic_prefix,
                         resume_buffer=100, heartbeat_s=0.5) as st:  # fmt: skip
        drive = Driver(st)
        async with _open(st, "/v1/ws/zones") as c:
            snap = await _recv(c)
        seen, epoch = snap["seq"], snap["epoch"]
        assert epoch == drive.book.epoch
        drive.change("Z001", note="one")
        drive.change("Z003", note="one")
        drive.change("Z003", note="two")
        async with _open(st, f"/v1/ws/zones?since={epoch}:{seen}") as c:
            first = await _recv(c)
            assert first["type"] == "delta" and first["resumed"] is True
            assert first["seq"] == drive.book.seq and first["epoch"] == epoch
            assert [(z["zone_id"], z["note"]) for z in first["zones"]] == [
                ("Z001", "one"),
                ("Z003", "two"),
            ]
            assert first["conflated"] is True  # Z003's first change was skipped
            # Idle: heartbeats carry the seq to resume from.
            beat = await _recv(c)
            assert beat == {"type": "heartbeat", "seq": drive.book.seq, "epoch": epoch}
            seen = beat["seq"]
        async with _open(st, f"/v1/ws/zones?since={epoch}:{seen}") as c:
            first = await _recv(c)
            assert first == {"type": "delta", "seq": seen, "epoch": epoch, "zones": [],
                             "conflated": False, "resumed": True}  # fmt: skip
        # Under a filter given on the URL, the missed changes are filtered too.
        drive.change("Z005", note="three")
        drive.change("Z006", note="three", status="active")
        async with _open(st, f"/v1/ws/zones?since={epoch}:{seen}&status=active") as c:
            first = await _recv(c)
            assert first["zones"] == [
                {"zone_id": "Z005", "excluded": True},
                drive.book.zones["Z006"],
            ]
        # Further back than the book keeps, or from another numbering: a fresh snapshot.
        old = drive.book.seq
        for i in range(150):
            drive.change(f"Z00{i % 10}", note=str(i))
        for since in (f"{epoch}:{old}", f"{epoch}:{10**9}"):
            async with _open(st, f"/v1/ws/zones?since={since}") as c:
                first = await _recv(c)
                assert first["type"] == "snapshot" and first["resumed"] is False
                assert first["seq"] == drive.book.seq and len(first["zones"]) == 12


def test_resume_gets_exactly_what_was_missed_or_a_snapshot(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_resume_scenario(kafka_bootstrap, database_url, topic_prefix))


async def _restart_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with api_stack(kafka_bootstrap, database_url, topic_prefix) as st:
        drive = Driver(st)
        async with _open(st, "/v1/ws/zones") as c:
            snap = await _recv(c)
        assert re.fullmatch("[0-9a-f]{8}", snap["epoch"])
        held = {z["zone_id"]: z for z in snap["zones"]}
        seen, old_epoch = snap["seq"], snap["epoch"]
        drive.change("Z002", note="while the console was away")
        # The API restarts (or the console lands on another replica): a new book replays the
        # statuses in its own numbering, past the seq the console holds.
        old = drive.book
        new = StatusBook(keep=old.keep, epoch="feedf00d")
        for zone_id in sorted(old.zones):
            new.apply(old.zones[zone_id])
        drive.ctx.book = drive.book = new
        while new.seq <= seen + 1:
            drive.change("Z005", note=f"n{new.seq}")
        assert new.changes_since(seen) is not None  # numbered past it: it would "resume"
        for since in (f"{old_epoch}:{seen}", str(seen), f"deadbeef:{seen}"):
            async with _open(st, f"/v1/ws/zones?since={since}") as c:
                first = await _recv(c)
                assert first["type"] == "snapshot" and first["resumed"] is False, since
                assert first["epoch"] == "feedf00d" and first["seq"] == new.seq
                assert first["zones"] == [new.zones[z] for z in sorted(new.zones)]
        assert held["Z002"] != new.zones["Z002"]
        # In the new numbering it resumes.
        async with _open(st, f"/v1/ws/zones?since=feedf00d:{new.seq - 1}") as c:
            first = await _recv(c)
            assert first["type"] == "delta" and first["resumed"] is True
            assert first["epoch"] == "feedf00d" and first["zones"] == [new.zones["Z005"]]


def test_a_seq_from_before_a_restart_or_another_replica_gets_a_snapshot(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_restart_scenario(kafka_bootstrap, database_url, topic_prefix))


async def _closed_within(c: ClientConnection, timeout_s: float) -> int | None:
    """Reads until the server closes the connection; its close code."""
    async with asyncio.timeout(timeout_s):
        with pytest.raises(ConnectionClosed):
            while True:
                await c.recv()
    return c.close_code


async def _revoked_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    secret = "s" * 32
    async with api_stack(kafka_bootstrap, database_url, topic_prefix, key_cache_s=0.5,
                         heartbeat_s=0.5, jwt_secret=secret) as st:  # fmt: skip
        async with st.pool.acquire() as conn:
            zones_key, zones_rec = await keys.create_key(conn, "dispatcher", None, "soon revoked",
                                                         "test", "test")  # fmt: skip
            audit_key, audit_rec = await keys.create_key(conn, "auditor", None, "soon revoked",
                                                         "test", "test")  # fmt: skip
        soon = int(time.time()) + 3
        claims = {"sub": "console-9", "role": "dispatcher", "exp": soon}
        expiring = jwt.encode(claims, secret, algorithm="HS256")
        async with (
            _open(st, f"/v1/ws/zones?token={zones_key}", None) as z,
            _open(st, f"/v1/ws/audit?token={audit_key}", None, max_queue=None) as a,
            _open(st, f"/v1/ws/zones?token={expiring}", None) as j,
            _open(st, "/v1/ws/zones") as kept,
        ):
            assert (await _recv(z))["type"] == "snapshot"
            assert (await _recv(a))["type"] == "audit"
            assert (await _recv(j))["type"] == "snapshot"
            assert (await _recv(kept))["type"] == "snapshot"
            async with st.pool.acquire() as conn:
                await keys.revoke_key(conn, zones_rec.key_id, "test", "test")
                await keys.revoke_key(conn, audit_rec.key_id, "test", "test")
            revoked = time.monotonic()
            assert await _closed_within(z, 10) == 4401
            assert await _closed_within(a, 10) == 4401
            assert time.monotonic() - revoked < 5
            assert z.close_reason == "invalid or revoked credential"
            # The JWT's stream ends once it has expired.
            assert await _closed_within(j, 15) == 4401
            assert time.time() >= soon
            # A console whose key still holds keeps its stream.
            assert (await _until(kept, lambda f: f["type"] == "heartbeat"))[-1]["seq"] >= 0


def test_revoked_keys_and_expired_tokens_lose_their_streams(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_revoked_scenario(kafka_bootstrap, database_url, topic_prefix))


# -- /v1/ws/audit -------------------------------------------------------------------------------


async def _table(pool: asyncpg.Pool) -> list[tuple[int, str]]:
    rows = await pool.fetch("SELECT seq, encode(hash, 'hex') AS hash FROM audit_log ORDER BY seq")
    return [(r["seq"], r["hash"]) for r in rows]


async def _settled(pool: asyncpg.Pool, quiet_s: float = 1.0) -> None:
    """Until the audit log stops growing: the stack's own services append to it too (the
    zones' dosewatch.zone.changed, after their trip through Kafka), later on a loaded machine."""
    last, since = await _table(pool), time.monotonic()
    while time.monotonic() - since < quiet_s:
        await asyncio.sleep(0.2)
        now = await _table(pool)
        if now != last:
            last, since = now, time.monotonic()


async def _audit_scenario(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> None:
    async with api_stack(kafka_bootstrap, database_url, topic_prefix, heartbeat_s=0.5) as st:
        await _settled(st.pool)

        async def add(n: int, tag: str) -> None:
            async with st.pool.acquire() as conn:
                for i in range(n):
                    await append_event(conn, "dosewatch.key.created", f"{tag}-{i}",
                                       {"key_id": f"{tag}-{i}"}, "test", "test")  # fmt: skip

        async def audit_rows(c: ClientConnection, count: int) -> list[Frame]:
            frames = await _until(c, lambda f: f["type"] == "audit" and f["seq"] >= count)
            return [f for f in frames if f["type"] == "audit"]

        got: list[Frame] = []
        async with _open(st, "/v1/ws/audit?after=0", "auditor") as c:
            table = await _table(st.pool)
            assert table  # the stack's keys were audited
            got += await audit_rows(c, table[-1][0])
            await add(3, "live")  # while connected: NOTIFY wakes the stream
            table = await _table(st.pool)
            got += await audit_rows(c, table[-1][0])
        await add(5, "offline")
        await _settled(st.pool)
        async with _open(st, f"/v1/ws/audit?after={got[-1]['seq']}", "admin") as c:
            table = await _table(st.pool)
            got += await audit_rows(c, table[-1][0])
            beat = await _recv(c)  # nothing more: heartbeats, at the last seq
            assert beat == {"type": "heartbeat", "seq": table[-1][0]}
        assert [(f["seq"], f["hash"]) for f in got] == table  # no gaps, no duplicates
        assert got[-1]["event"]["subject"] == "offline-4"
        assert got[-1]["event"]["data"]["actor"] == "test"


def test_audit_stream_resumes_without_gaps_or_duplicates(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    asyncio.run(_audit_scenario(kafka_bootstrap, database_url, topic_prefix))
