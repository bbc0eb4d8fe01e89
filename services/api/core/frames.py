"""Websocket frames for /v1/ws/zones and /v1/ws/audit: what a client may send, what it is sent,
and the per-tick cache that encodes each distinct frame once. Pure: no I/O.

Server frames (JSON text):
    {"type": "snapshot", "seq": N, "epoch": E, "zones": [...], "filter": {...}[, "resumed": false]}
    {"type": "delta", "seq": N, "epoch": E, "zones": [...], "conflated": bool[, "resumed": true]}
    {"type": "heartbeat", "seq": N, "epoch": E}        (audit heartbeats: no epoch)
    {"type": "error", "detail": "..."}
    {"type": "audit", "seq": N, "hash": "...", "event": {...}}
In a delta, a deleted zone is {"zone_id", "deleted": true}, and a zone whose new status is
outside the client's status filter is {"zone_id", "excluded": true} (it left the filter).
A zones seq counts within its epoch (one per API process, see statusbook): a client resumes
with ?since=<epoch>:<seq>."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.api.core.statusbook import Changes

Keep = Callable[[str, dict[str, Any]], bool]
Bbox = tuple[float, float, float, float]

MAX_CLIENT_MESSAGE = 4096


class FrameError(ValueError):
    """A client message that cannot be used; the text goes back in an error frame."""


@dataclass(frozen=True, slots=True)
class View:
    """What one client asked to see. `area` is the bbox/district predicate (None: everywhere);
    statuses are applied here so that a zone leaving the status filter can be announced."""

    statuses: tuple[str, ...] = ()
    bbox: Bbox | None = None
    district: str | None = None
    area: Keep | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[tuple[str, ...], Bbox | None, str | None]:
        return self.statuses, self.bbox, self.district

    @property
    def area_key(self) -> tuple[Bbox | None, str | None]:
        return self.bbox, self.district

    def describe(self) -> dict[str, Any]:
        return {"status": list(self.statuses), "bbox": self.bbox, "district": self.district}

    def keeps(self, zone_id: str, status: dict[str, Any]) -> bool:
        if self.statuses and status.get("status") not in self.statuses:
            return False
        return self.area is None or self.area(zone_id, status)


@dataclass(frozen=True, slots=True)
class FilterRequest:
    """A filter as sent, before the adapter validates bbox and status names."""

    statuses: list[str] | None
    bbox: str | None
    district: str | None


def encode(doc: dict[str, Any]) -> str:
    # Text frames (browsers hand binary frames over as Blobs); decoded once, sent to many.
    return orjson.dumps(doc).decode()


def snapshot_frame(snap: Changes, view: View, resumed: bool | None = None) -> str:
    doc: dict[str, Any] = {"type": "snapshot", "seq": snap.seq, "epoch": snap.epoch,
                           "zones": snap.statuses, "filter": view.describe()}  # fmt: skip
    if resumed is not None:
        doc["resumed"] = resumed
    return encode(doc)


def delta_entries(statuses: list[dict[str, Any]], view: View) -> list[dict[str, Any]]:
    """Changed zones for a view whose area filter has already been applied (changes_since
    with view.area). A status filter cannot be applied there: the client must hear that a zone
    it holds has moved out of it."""
    if not view.statuses:
        return statuses
    out: list[dict[str, Any]] = []
    for s in statuses:
        if s.get("deleted") or s.get("status") in view.statuses:
            out.append(s)
        else:
            out.append({"zone_id": s["zone_id"], "excluded": True})
    return out


def delta_frame(changes: Changes, view: View, resumed: bool | None = None) -> str | None:
    """None when nothing changed for this view (a resume always gets its frame)."""
    zones = delta_entries(changes.statuses, view)
    if not zones and resumed is None:
        return None
    doc: dict[str, Any] = {"type": "delta", "seq": changes.seq, "epoch": changes.epoch,
                           "zones": zones, "conflated": changes.conflated}  # fmt: skip
    if resumed is not None:
        doc["resumed"] = resumed
    return encode(doc)


def heartbeat_frame(seq: int, epoch: str | None = None) -> str:
    """Zones heartbeats carry the book's epoch; audit seqs are the database's, with none."""
    if epoch is None:
        return encode({"type": "heartbeat", "seq": seq})
    return encode({"type": "heartbeat", "seq": seq, "epoch": epoch})


def error_frame(detail: str) -> str:
    return encode({"type": "error", "detail": detail})


def audit_frame(row: dict[str, Any]) -> str:
    return encode({"type": "audit", "seq": row["seq"], "hash": row["hash"], "event": row["event"]})


class TickFrames:
    """Frames of one tick. Clients at the same seq under the same filter get the same string:
    at 1,000 consoles a tick encodes a handful of frames, not a thousand."""

    def __init__(self) -> None:
        self._frames: dict[tuple[Any, ...], str | None] = {}
        self._changes: dict[tuple[Any, ...], Changes | None] = {}
        self.encoded = 0

    def get(self, key: tuple[Any, ...], build: Callable[[], str | None]) -> str | None:
        try:
            return self._frames[key]
        except KeyError:
            frame = self._frames[key] = build()
            self.encoded += 1
            return frame

    def changes(self, key: tuple[Any, ...], build: Callable[[], Changes | None]) -> Changes | None:
        """changes_since once per (seq, area), shared by the status filters over that area."""
        try:
            return self._changes[key]
        except KeyError:
            changes = self._changes[key] = build()
            return changes


def parse_seq(text: str | None, name: str) -> int | None:
    """An ?after= value (or the seq of a ?since=): absent -> None; anything but a non-negative
    integer in ASCII digits is an error, never a silent start from scratch. (str.isdigit alone
    admits "²", which int() refuses, and other scripts' digits, which int() reads.)"""
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise FrameError(f"{name} must be a non-negative integer sequence number")
    return int(text)


MAX_EPOCH = 64


@dataclass(frozen=True, slots=True)
class ResumeFrom:
    """Where a zones client says it is: a seq, and the epoch it counts in (None: a bare seq,
    from a client that predates epochs; nothing can be resumed from it)."""

    epoch: str | None
    seq: int


def parse_since(text: str | None) -> ResumeFrom | None:
    """A ?since= value: `<epoch>:<seq>` as the frames give them, or a bare `<seq>`."""
    if text is None or text == "":
        return None
    epoch, colon, seq = text.rpartition(":")
    if colon and not (0 < len(epoch) <= MAX_EPOCH and epoch.isascii() and epoch.isalnum() and seq):
        raise FrameError("since must be <epoch>:<seq> as the last frame gave them")
    at = parse_seq(seq, "since")
    assert at is not None
    return ResumeFrom(epoch if colon else None, at)


def parse_client_message(text: str | bytes) -> FilterRequest:
    """The only message a zones client sends: {"type": "filter", "status": [...],
    "bbox": "w,s,e,n", "district": "..."}; every field but type is optional."""
    if len(text) > MAX_CLIENT_MESSAGE:
        raise FrameError(f"message over {MAX_CLIENT_MESSAGE} bytes")
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError("message is not JSON") from None
    if not isinstance(msg, dict):
        raise FrameError('message must be a JSON object like {"type": "filter", ...}')
    kind = msg.get("type")
    if kind != "filter":
        raise FrameError(f'unknown message type {kind!r}: the only one is "filter"')
    unknown = set(msg) - {"type", "status", "bbox", "district"}
    if unknown:
        raise FrameError(f"unknown filter fields {sorted(unknown)}; use status, bbox, district")
    statuses = msg.get("status")
    if isinstance(statuses, str):
        statuses = [statuses]
    if statuses is not None and not (
        isinstance(statuses, list) and all(isinstance(s, str) for s in statuses)
    ):
        raise FrameError("status must be a list of status names")
    bbox = msg.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox):
        bbox = ",".join(str(v) for v in bbox)
    if bbox is not None and not isinstance(bbox, str):
        raise FrameError("bbox must be 'min_lon,min_lat,max_lon,max_lat' or a list of 4 numbers")
    district = msg.get("district")
    if district is not None and not (isinstance(district, str) and len(district) <= 200):
        raise FrameError("district must be a string of at most 200 characters")
    return FilterRequest(statuses or None, bbox or None, district)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
