"""Websockets: /v1/ws/zones (live zone status for dispatch consoles) and /v1/ws/audit.

Zones fan out from ONE hub task per process, not a send per client per change (that loads a
core at 1,000 consoles x 200 changes/s). The hub ticks at most every tick_ms: it wakes on
ctx.changed, sleeps out the rest of the tick so changes coalesce, and then hands each client
at most one frame, encoded once per (from seq, filter). A client whose previous frame is still
going out is skipped: it holds no queue, only the seq it has been sent up to, and later gets
the latest state of each zone changed since (`conflated: true` when that skipped states). A
frame that waits over send_timeout_s closes the client (4408).

Seqs count within the book's epoch (one per process): a client resumes with
?since=<epoch>:<seq>, and a seq of another epoch (a restart, another replica) or without one
gets a fresh snapshot, never a delta in a numbering it does not hold.

Credentials are checked at connect and again every key_cache_s while the stream lasts (the
hub rechecks zones clients, each audit handler its own): a revoked key or an expired JWT
loses its stream (4401) within about twice key_cache_s. A credential store that cannot answer
a recheck keeps streams open; the next recheck tries again.

Close codes: 4401 no or bad credential, 4403 role not admitted, 4400 bad query, 4408 too slow,
1011 credential store unavailable. The connection is accepted first so clients see them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from prometheus_client import Counter, Gauge

from services.api.audit import events_after
from services.api.auth import AuthError, ws_token_of
from services.api.context import ApiContext
from services.api.core.frames import (
    FilterRequest,
    FrameError,
    TickFrames,
    View,
    audit_frame,
    delta_frame,
    error_frame,
    heartbeat_frame,
    parse_client_message,
    parse_seq,
    parse_since,
    snapshot_frame,
)
from services.api.keys import Role
from services.api.routes_status import parse_bbox, status_filter

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

AUDIT_CHANNEL = "dosewatch_audit"  # NOTIFY'd with the seq by a trigger (migration 0003)

CLIENTS = Gauge("dosewatch_ws_clients", "Websocket clients connected", ["endpoint"])
FRAMES = Counter("dosewatch_ws_frames_sent_total", "Websocket frames sent", ["endpoint"])
CONFLATIONS = Counter(
    "dosewatch_ws_conflations_total",
    "Ticks a zones client was skipped because its previous frame had not gone out; it gets "
    "the latest state per zone later",
)
SLOW_CLOSED = Counter(
    "dosewatch_ws_slow_closed_total",
    "Websocket clients closed because a frame waited over send_timeout_s",
    ["endpoint"],
)


Refusal = tuple[int, str]  # a close code and its reason

ZONE_ROLES: tuple[Role, ...] = ("dispatcher",)
AUDIT_ROLES: tuple[Role, ...] = ("auditor",)


async def _admit(ws: WebSocket, ctx: ApiContext, *roles: Role) -> str | None:
    """The client's credential, kept to recheck it; None when it has been closed."""
    # Accept before checking: a close before accept is a bare HTTP 403 with no close code.
    await ws.accept()
    token = ws_token_of(ws)
    try:
        refused = await _refusal(ctx, token, roles)
    except (asyncpg.PostgresError, OSError):
        log.warning("websocket credential check failed", exc_info=True)
        refused = 1011, "credential store unavailable; retry"
    if refused is not None or token is None:
        await _close(ws, *(refused or (4401, "missing credential")))
        return None
    return token


async def _refusal(ctx: ApiContext, token: str | None, roles: tuple[Role, ...]) -> Refusal | None:
    """Why this credential may not (or may no longer) use the endpoint; None if it may. The
    credential store's errors propagate: whether that refuses is the caller's choice."""
    try:
        principal = await ctx.auth.authenticate(token)
    except AuthError as exc:
        return 4401, exc.detail
    if not principal.may(*roles):
        return 4403, f"role {principal.role!r} may not use this endpoint"
    return None


async def _recheck(ctx: ApiContext, token: str, roles: tuple[Role, ...]) -> Refusal | None:
    """A streaming client's credential again; a store that cannot answer refuses nothing."""
    try:
        return await _refusal(ctx, token, roles)
    except (asyncpg.PostgresError, OSError) as exc:
        log.warning("websocket credential recheck failed", extra={"error": repr(exc)})
        return None


def _recheck_every(ctx: ApiContext) -> float:
    # The authenticator caches for key_cache_s: checking more often would find nothing new.
    return max(ctx.settings.key_cache_s, 0.5)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    # A client that stopped reading cannot take a close frame either: give up after a second.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await ws.close(code, reason[:120])


def _ctx(ws: WebSocket) -> ApiContext:
    ctx: ApiContext = ws.app.state.ctx
    return ctx


# -- /v1/ws/zones ------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class ZoneClient:
    ws: WebSocket
    view: View
    task: asyncio.Task[Any] | None  # its handler, cancelled when the hub drops it
    token: str = ""  # its credential, rechecked every key_cache_s
    seq: int = 0  # what it has been handed up to: its single slot of pending state
    fresh: bool = True  # its first frame (snapshot, or the resume delta) is still due
    resume: bool = False  # seq came from ?since=
    epoch: str | None = None  # the numbering that seq came in (None: it did not say)
    sending: asyncio.Future[None] | None = None
    sent_at: float = 0.0  # loop time its last frame was handed to the socket
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=4))
    frames: int = 0
    skipped: int = 0
    dropped: bool = False  # by the hub: `closing` says why
    closing: Refusal | None = None

    @property
    def queued(self) -> int:
        """Frames handed over and not yet written: 0 or 1, whatever the client does."""
        return int(self.sending is not None and not self.sending.done())


class ZoneHub:
    """Started by the first zones client of an API process; ends with the last one."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.clients: set[ZoneClient] = set()
        self.ticks = 0
        self.tick_seq = 0  # the book's seq at the last tick
        self.encoded = 0
        self._last = 0.0
        self._checked = 0.0
        self._task: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None

    def join(self, client: ZoneClient) -> None:
        self.clients.add(client)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ws-zones-hub")
            self._task.add_done_callback(_log_failure)
        self.ctx.changed.set()

    def leave(self, client: ZoneClient) -> None:
        self.clients.discard(client)
        if client.sending is not None:
            client.sending.cancel()
        self.ctx.changed.set()  # lets the hub end if that was the last client

    def request(self, client: ZoneClient, text: str | bytes) -> None:
        """A client message: a new filter gets a fresh snapshot, anything else an error."""
        try:
            client.view = _view(self.ctx, parse_client_message(text))
        except FrameError as exc:
            client.errors.append(error_frame(str(exc)))
        else:
            client.fresh, client.resume = True, False
        self.ctx.changed.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._checked = loop.time()  # clients were checked as they connected
        try:
            while self.clients:
                await self._wait(loop)
                if self.clients:
                    try:
                        self.tick(loop.time())
                    except Exception:  # a bug must not silence every console for good
                        log.exception("zones hub tick failed")
                    self._maybe_recheck(loop.time())
        finally:
            if self._checking is not None:
                self._checking.cancel()
            if _zone_hubs.get(id(self.ctx)) is self:
                del _zone_hubs[id(self.ctx)]

    def _maybe_recheck(self, now: float) -> None:
        """Credentials again every key_cache_s, in a task of its own: the ticks go on while it
        waits for the credential store."""
        if self._checking is not None and not self._checking.done():
            return
        if now - self._checked < _recheck_every(self.ctx):
            return
        self._checked = now
        self._checking = asyncio.create_task(self._recheck(), name="ws-zones-recheck")
        self._checking.add_done_callback(_log_failure)

    async def _recheck(self) -> None:
        # Once per credential, not per client: a shared key costs one check.
        verdicts: dict[str, Refusal | None] = {}
        for c in list(self.clients):
            if c.token not in verdicts:
                verdicts[c.token] = await _recheck(self.ctx, c.token, ZONE_ROLES)
            refused = verdicts[c.token]
            if refused is not None and c in self.clients:
                self._drop(c, refused)

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        s = self.ctx.settings
        if not self.ctx.changed.is_set():
            # Idle: still wake for heartbeats and to time out stuck sends.
            idle = min(1.0, s.heartbeat_s / 2, s.send_timeout_s / 2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await self.ctx.changed.wait()
        delay = self._last + s.tick_ms / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # changes arriving meanwhile go out in this tick

    def tick(self, now: float) -> None:
        self.ctx.changed.clear()
        self._last = now
        self.ticks += 1
        s = self.ctx.settings
        seq = self.tick_seq = self.ctx.book.seq
        frames = TickFrames()
        sent = skipped = 0
        for c in list(self.clients):
            if c.sending is not None:
                if not c.sending.done():
                    if now - c.sent_at > s.send_timeout_s:
                        self._drop(c, _TOO_SLOW)
                        SLOW_CLOSED.labels("zones").inc()
                    elif c.fresh or c.errors or c.seq != seq:
                        c.skipped += 1
                        skipped += 1
                    continue
                c.sending = None
            batch = self._frames_for(c, seq, now, frames)
            if batch:
                self._send(c, batch, now)
                sent += len(batch)
        self.encoded += frames.encoded
        if sent:
            _FRAMES_ZONES.inc(sent)
        if skipped:
            CONFLATIONS.inc(skipped)

    def _frames_for(self, c: ZoneClient, seq: int, now: float, frames: TickFrames) -> list[str]:
        book, view = self.ctx.book, c.view
        out = list(c.errors)
        c.errors.clear()
        frame: str | None = None
        if c.fresh:
            c.fresh = False
            since = c.seq
            changes = None
            if c.resume:  # None unless c.epoch is the book's: then a snapshot
                resume = partial(book.resume, c.epoch, since, view.area)
                changes = frames.changes((c.epoch, since, view.area_key), resume)
            if changes is not None:
                frame = frames.get(("resume", since, view.key),
                                   partial(delta_frame, changes, view, True))  # fmt: skip
                c.seq = changes.seq
            else:
                frame = self._snapshot(view, False if c.resume else None, frames)
                c.seq = seq
            c.resume = False
        elif c.seq != seq:
            since = c.seq
            changes = frames.changes((since, view.area_key),
                                     partial(book.changes_since, since, view.area))  # fmt: skip
            if changes is None:  # fell further behind than the book keeps
                frame = self._snapshot(view, None, frames)
                c.seq = seq
            else:
                frame = frames.get(("delta", since, view.key), partial(delta_frame, changes, view))
                c.seq = changes.seq
        if frame is not None:
            out.append(frame)
        elif not out and now - c.sent_at >= self.ctx.settings.heartbeat_s:
            beat = frames.get(("heartbeat", c.seq), partial(heartbeat_frame, c.seq, book.epoch))
            assert beat is not None
            out.append(beat)
        return out

    def _snapshot(self, view: View, resumed: bool | None, frames: TickFrames) -> str:
        def build() -> str:
            return snapshot_frame(self.ctx.book.snapshot(view.keeps), view, resumed)

        frame = frames.get(("snapshot", view.key, resumed), build)
        assert frame is not None
        return frame

    def _send(self, c: ZoneClient, batch: list[str], now: float) -> None:
        c.sent_at = now
        c.frames += len(batch)
        c.sending = _start(_send_all(c.ws, batch))
        if c.sending is not None:
            c.sending.add_done_callback(partial(self._sent, c))

    def _sent(self, c: ZoneClient, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # Gone mid-send: its handler hears the disconnect and leaves; stop sending now.
            self.clients.discard(c)
            log.debug("zones client send failed", extra={"error": repr(exc)})

    def _drop(self, c: ZoneClient, why: Refusal) -> None:
        """Stop sending to it now; its handler closes the socket with `why`."""
        c.dropped, c.closing = True, why
        self.clients.discard(c)
        if c.sending is not None:
            c.sending.cancel()
        if c.task is not None:
            c.task.cancel()


_TOO_SLOW: Refusal = (4408, "too slow: a frame waited over send_timeout_s")


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


async def _send_all(ws: WebSocket, batch: list[str]) -> None:
    for frame in batch:
        await ws.send_text(frame)


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None] | None:
    """Run `coro` now, in the caller, up to its first real wait: None if it finished. Only a
    send that waits for the socket becomes a task. A task per send (a Task, its first step,
    its done callback) was a third of the hub's CPU at 1,000 clients; 3.12's eager tasks do
    the same thing."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    except BaseException as exc:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return failed
    task = asyncio.ensure_future(_resume(coro, waiting))
    # Cancelled (even before its first step): the coroutine unwinds from where it waits.
    task.add_done_callback(lambda _: coro.close())
    return task


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    # The coroutine yielded a future it waits on (or None: a bare yield). Wait for it here,
    # without awaiting it a second time, then step the coroutine on: it reads the outcome.
    while True:
        if waiting is None:
            await asyncio.sleep(0)
        else:
            await asyncio.wait((waiting,))
        try:
            waiting = coro.send(None)
        except StopIteration:
            return


_FRAMES_ZONES = FRAMES.labels("zones")
_zone_hubs: dict[int, ZoneHub] = {}  # by id(ctx): one hub per API process (tests run several)


def zone_hub(ctx: ApiContext) -> ZoneHub | None:
    """The running hub of this API, if any client is connected (for tests and debugging)."""
    return _zone_hubs.get(id(ctx))


def _view(ctx: ApiContext, req: FilterRequest) -> View:
    try:
        bbox = parse_bbox(req.bbox) if req.bbox else None
        status_filter(ctx, req.statuses, None, None)  # checks the names
        area = None
        if bbox is not None or req.district is not None:
            area = status_filter(ctx, None, bbox, req.district)
    except HTTPException as exc:
        raise FrameError(str(exc.detail)) from None
    return View(tuple(sorted(set(req.statuses or ()))), bbox, req.district, area)


@router.websocket("/ws/zones")
async def zones_stream(websocket: WebSocket) -> None:
    """Live zone status for dispatch consoles (dispatcher, admin). See the module docstring;
    `?since=<epoch>:<seq>` resumes, `?status=&bbox=&district=` or a filter message narrow the
    view."""
    ctx = _ctx(websocket)
    token = await _admit(websocket, ctx, *ZONE_ROLES)
    if token is None:
        return
    client = ZoneClient(websocket, View(), asyncio.current_task(), token)
    q = websocket.query_params
    try:
        since = parse_since(q.get("since"))
        client.view = _view(
            ctx, FilterRequest(q.getlist("status") or None, q.get("bbox"), q.get("district"))
        )
    except FrameError as exc:
        await _close(websocket, 4400, str(exc))
        return
    if since is not None:  # resumed only if since.epoch is the book's (ZoneHub._frames_for)
        client.seq, client.epoch, client.resume = since.seq, since.epoch, True
    hub = _zone_hubs.get(id(ctx))
    if hub is None:
        hub = _zone_hubs[id(ctx)] = ZoneHub(ctx)
    hub.join(client)
    CLIENTS.labels("zones").inc()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            hub.request(client, message.get("text") or message.get("bytes") or "")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if client.closing is None or task is None:
            raise
        task.uncancel()  # the hub's own drop, not a shutdown
        await _close(websocket, *client.closing)
    finally:
        hub.leave(client)
        CLIENTS.labels("zones").dec()


# -- /v1/ws/audit ------------------------------------------------------------------------------


class AuditFeed:
    """LISTEN dosewatch_audit on one connection per API process, shared by every audit client
    (started by the first, closed with the last). Clients wait for `gen` to move, then read
    from their own cursor: a lost notification costs latency, never a row."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.users = 0
        self.gen = 0
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self.gen += 1
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait_past(self, gen: int, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.gen == gen:
                    await self._moved.wait()
        return self.gen != gen

    def join(self) -> None:
        self.users += 1
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="ws-audit-listen")
            self._task.add_done_callback(_log_failure)

    async def leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self._task is not None:
            if _audit_feeds.get(id(self.ctx)) is self:
                del _audit_feeds[id(self.ctx)]  # a client arriving now starts a new one
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        url = self.ctx.settings.database_url.get_secret_value()
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(url)
                lost = asyncio.Event()
                conn.add_termination_listener(partial(_on_lost, lost))
                await conn.add_listener(AUDIT_CHANNEL, lambda *_: self.poke())
                self.poke()  # rows committed before LISTEN took effect: clients re-read
                await lost.wait()
                log.warning("audit listener connection lost; reconnecting")
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("audit listener failed; retrying", extra={"error": str(exc)})
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2.0)
            await asyncio.sleep(1.0)


def _on_lost(lost: asyncio.Event, _conn: asyncpg.Connection) -> None:
    lost.set()


_audit_feeds: dict[int, AuditFeed] = {}


async def _audit_pump(ws: WebSocket, ctx: ApiContext, feed: AuditFeed, after: int) -> None:
    """Rows after the cursor in seq order, a page at a time, then whatever NOTIFY announces.
    Seq order is commit order (migration 0003), so paging by seq neither skips nor repeats."""
    s = ctx.settings
    page = min(500, s.max_page)
    cursor = after
    frames = FRAMES.labels("audit")
    while True:
        gen = feed.gen
        try:
            async with ctx.pool.acquire() as conn:
                rows = await events_after(conn, cursor, page)
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("audit read failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(1.0)
            continue
        for row in rows:
            async with asyncio.timeout(s.send_timeout_s):
                await ws.send_text(audit_frame(row))
            cursor = row["seq"]
        frames.inc(len(rows))
        if len(rows) < page and not await feed.wait_past(gen, s.heartbeat_s):
            async with asyncio.timeout(s.send_timeout_s):
                await ws.send_text(heartbeat_frame(cursor))
            frames.inc()


@router.websocket("/ws/audit")
async def audit_stream(websocket: WebSocket) -> None:
    """The audit log in seq order (auditor, admin), from `?after=<seq>` (default 0: from the
    start), then live. Reconnect with the last seq received: no gaps, no repeats."""
    ctx = _ctx(websocket)
    token = await _admit(websocket, ctx, *AUDIT_ROLES)
    if token is None:
        return
    try:
        after = parse_seq(websocket.query_params.get("after"), "after") or 0
    except FrameError as exc:
        await _close(websocket, 4400, str(exc))
        return
    feed = _audit_feeds.get(id(ctx))
    if feed is None:
        feed = _audit_feeds[id(ctx)] = AuditFeed(ctx)
    feed.join()
    CLIENTS.labels("audit").inc()
    pump = asyncio.create_task(_audit_pump(websocket, ctx, feed, after))
    loop = asyncio.get_running_loop()
    checked = loop.time()
    receive: asyncio.Future[Any] | None = None
    refused: Refusal | None = None
    try:
        while True:
            if receive is None:
                receive = asyncio.ensure_future(websocket.receive())
            wait_s = max(0.0, checked + _recheck_every(ctx) - loop.time())
            await asyncio.wait({pump, receive}, timeout=wait_s,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if pump.done():
                break
            if receive.done():
                message, receive = receive.result(), None
                if message["type"] == "websocket.disconnect":
                    break
                reply = error_frame("this stream takes no messages; resume with ?after=<seq>")
                await _run_with_timeout(websocket.send_text(reply), ctx.settings.send_timeout_s)
            elif loop.time() - checked >= _recheck_every(ctx):
                checked = loop.time()
                refused = await _recheck(ctx, token, AUDIT_ROLES)
                if refused is not None:
                    break
    finally:
        if receive is not None:
            receive.cancel()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        await feed.leave()
        CLIENTS.labels("audit").dec()
    if refused is not None:
        await _close(websocket, *refused)
        return
    if pump.cancelled():
        return
    failure = pump.exception()
    if isinstance(failure, TimeoutError):
        SLOW_CLOSED.labels("audit").inc()
        await _close(websocket, *_TOO_SLOW)
    elif failure is not None and not isinstance(
        failure, WebSocketDisconnect | OSError | RuntimeError
    ):
        log.error("audit stream failed", exc_info=failure)
        await _close(websocket, 1011, "internal error; it has been logged")


async def _run_with_timeout(coro: Coroutine[Any, Any, None], timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError, OSError, RuntimeError):
        async with asyncio.timeout(timeout_s):
            await coro
