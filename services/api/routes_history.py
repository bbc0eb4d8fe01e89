"""Visit and zone-period history: GET /v1/history/visits and /v1/history/zone-periods.

Rows have the fields of replay's visits.jsonl and zone_periods.jsonl, in replay's order, so a
full export equals the replay files. Pages are keyset-paged on that order (an opaque cursor
names the last row sent), so rows written meanwhile never shift a page: no gaps, no repeats.
`format=csv` (or `Accept: text/csv`) gives the same rows as CSV: one page with `limit`, its
cursor in `X-Next-Cursor`; without `limit`, the whole selection streamed in pages."""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from schemas.records import VisitRecord, ZonePeriodRecord
from schemas.timefmt import datetime_to_ms, format_ts, ms_to_datetime, parse_ts
from services.api.auth import Principal, require
from services.api.context import ApiContext, Caller, Ctx

router = APIRouter(prefix="/v1", tags=["history"])

DEFAULT_PAGE = 100
_EPOCH = ms_to_datetime(0)
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]  # output fields, in replay's order
    times: frozenset[str]  # timestamptz columns, written as RFC 3339
    key: tuple[str, ...]  # unique; the page order and what a cursor holds
    time_filter: str  # `from`/`to` select on this column


VISITS = Table(
    "visits",
    ("unit_id", "zone_id", "started_at", "ended_at", "duration_s", "end_reason", "qualified",
     "target_met", "overstay"),
    frozenset({"started_at", "ended_at"}),
    ("started_at", "unit_id", "zone_id"),
    "started_at",
)  # fmt: skip
PERIODS = Table(
    "zone_periods",
    ("zone_id", "period_start", "period_end", "presence_s", "officer_s", "visits",
     "dosed_visits"),
    frozenset({"period_start", "period_end"}),
    ("zone_id", "period_start"),
    "period_start",
)  # fmt: skip


class VisitPage(BaseModel):
    rows: list[VisitRecord]
    next_cursor: str | None


class PeriodPage(BaseModel):
    rows: list[ZonePeriodRecord]
    next_cursor: str | None


def _invalid(where: str, problem: str) -> RequestValidationError:
    # Through the app's 422 handler, so these read like the framework's own validation errors.
    return RequestValidationError(
        [{"loc": ("query", where), "msg": problem, "type": "value_error"}]
    )


def _time_param(where: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        ms = parse_ts(text)
    except ValueError as exc:
        hint = " (a '+' in a URL reads as a space: send it as %2B)" if " " in text else ""
        raise _invalid(where, f"{exc}{hint}") from None
    try:
        return ms_to_datetime(ms)
    except OverflowError:
        # parse_ts range-checks epoch ms but not text: an offset can push year 1 or 9999 out.
        raise _invalid(where, "out of range: years 1–9999 in UTC") from None


def _text_param(where: str, text: str | None) -> str | None:
    if text is not None and "\x00" in text:
        raise _invalid(where, "must not contain NUL characters")  # PostgreSQL text cannot
    return text


def encode_cursor(table: Table, key: Sequence[Any]) -> str:
    parts: list[Any] = [table.name]
    for column, value in zip(table.key, key, strict=True):
        # Exact microseconds, not the ms of the output, so the cursor is the row's true key.
        parts.append((value - _EPOCH) // _US if column in table.times else value)
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def decode_cursor(table: Table, cursor: str) -> list[Any]:
    problem = "is not a cursor this endpoint issued"
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise _invalid("cursor", problem) from None
    if not isinstance(parts, list) or len(parts) != len(table.key) + 1 or parts[0] != table.name:
        raise _invalid("cursor", problem)
    key: list[Any] = []
    for column, value in zip(table.key, parts[1:], strict=True):
        if column in table.times:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _invalid("cursor", problem)
            try:
                key.append(_EPOCH + value * _US)
            except OverflowError:
                raise _invalid("cursor", problem) from None
        elif isinstance(value, str) and "\x00" not in value:
            key.append(value)
        else:
            raise _invalid("cursor", problem)
    return key


@dataclass(frozen=True, slots=True)
class Selection:
    """A validated selection: WHERE clause text and its arguments (values, never SQL)."""

    table: Table
    where: list[str]
    args: list[Any]

    def sql(self, after: list[Any] | None, limit: int) -> tuple[str, list[Any]]:
        where, args = list(self.where), list(self.args)
        if after is not None:
            marks = ", ".join(f"${len(args) + i + 1}" for i in range(len(after)))
            where.append(f"({', '.join(self.table.key)}) > ({marks})")
            args += after
        args.append(limit)
        text = (
            f"SELECT {', '.join(self.table.columns)} FROM {self.table.name}"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {', '.join(self.table.key)} LIMIT ${len(args)}"
        )
        return text, args


def selection(
    table: Table, equal: dict[str, str | None], from_: str | None, to: str | None
) -> Selection:
    where: list[str] = []
    args: list[Any] = []
    for column, value in equal.items():
        if _text_param(column, value) is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    start, end = _time_param("from", from_), _time_param("to", to)
    if start is not None and end is not None and start > end:
        raise _invalid("to", "must not be before 'from'")
    if start is not None:
        args.append(start)
        where.append(f"{table.time_filter} >= ${len(args)}")
    if end is not None:
        args.append(end)
        where.append(f"{table.time_filter} < ${len(args)}")
    return Selection(table, where, args)


def _row(table: Table, record: asyncpg.Record) -> dict[str, Any]:
    return {c: format_ts(datetime_to_ms(record[c])) if c in table.times else record[c]
            for c in table.columns}  # fmt: skip


async def _fetch(
    ctx: ApiContext, q: Selection, after: list[Any] | None, limit: int
) -> list[asyncpg.Record]:
    text, args = q.sql(after, limit)
    async with ctx.pool.acquire() as conn:
        records: list[asyncpg.Record] = await conn.fetch(text, *args)
    return records


def _csv(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if columns is not None:
        writer.writerow(columns)
    for row in rows:
        writer.writerow(
            ("true" if v else "false") if isinstance(v, bool) else v for v in row.values()
        )
    return out.getvalue().encode()


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "").lower()


async def page(
    ctx: ApiContext,
    request: Request,
    q: Selection,
    cursor: str | None,
    limit: int | None,
    fmt: str | None,
) -> Response:
    table = q.table
    after = decode_cursor(table, cursor) if cursor is not None else None
    csv_out = _wants_csv(request, fmt)
    if csv_out and limit is None:
        return StreamingResponse(
            _export(ctx, q, after), media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{table.name}.csv"'},
        )  # fmt: skip
    n = min(limit or DEFAULT_PAGE, ctx.settings.max_page)
    records = await _fetch(ctx, q, after, n + 1)  # one more: is there a next page?
    more = len(records) > n
    records = records[:n]
    rows = [_row(table, r) for r in records]
    next_cursor = encode_cursor(table, [records[-1][k] for k in table.key]) if more else None
    if csv_out:
        headers = {"Content-Disposition": f'attachment; filename="{table.name}.csv"'}
        if next_cursor is not None:
            headers["X-Next-Cursor"] = next_cursor
        return Response(_csv(rows, table.columns), media_type="text/csv; charset=utf-8",
                        headers=headers)  # fmt: skip
    body = orjson.dumps({"rows": rows, "next_cursor": next_cursor})
    return Response(body, media_type="application/json")


async def _export(ctx: ApiContext, q: Selection, after: list[Any] | None) -> AsyncIterator[bytes]:
    # Page by page, a connection per page: a slow download never pins a pooled connection.
    yield _csv([], q.table.columns)
    size = ctx.settings.max_page
    while True:
        records = await _fetch(ctx, q, after, size)
        if not records:
            return
        yield _csv([_row(q.table, r) for r in records])
        if len(records) < size:
            return
        after = [records[-1][k] for k in q.table.key]


async def history_caller(caller: Caller) -> Principal:
    # A dependency rather than a call in the handler: a refused role gets 403 before any 422.
    require(caller, "dispatcher", "auditor")
    return caller


HistoryCaller = Annotated[Principal, Depends(history_caller)]
ZoneId = Annotated[str | None, Query(min_length=1, max_length=200, description="one zone")]
From = Annotated[
    str | None,
    Query(alias="from", description="RFC 3339; rows starting at or after it (inclusive)",
          examples=["2026-05-14T18:00:00Z"]),
]  # fmt: skip
To = Annotated[
    str | None,
    Query(description="RFC 3339; rows starting before it (exclusive)",
          examples=["2026-05-15T00:00:00Z"]),
]  # fmt: skip
Limit = Annotated[
    int | None,
    Query(ge=1, description="rows per page, at most the server's max_page (default 100; "
                            "with format=csv and no limit, every row is streamed)"),
]  # fmt: skip
Cursor = Annotated[
    str | None, Query(max_length=2000, description="next_cursor of the previous page")
]
Format = Annotated[
    Literal["json", "csv"] | None,
    Query(alias="format", description="csv: the same rows as CSV (or send Accept: text/csv)"),
]

_CSV = {"text/csv": {"schema": {"type": "string"}}}


@router.get(
    "/history/visits",
    summary="Closed visits, filtered by zone, unit and start time; keyset-paged",
    response_model=None,
    responses={200: {"model": VisitPage, "content": _CSV}},
)
async def visits(
    ctx: Ctx,
    _: HistoryCaller,
    request: Request,
    zone_id: ZoneId = None,
    unit_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    from_: From = None,
    to: To = None,
    limit: Limit = None,
    cursor: Cursor = None,
    fmt: Format = None,
) -> Response:
    q = selection(VISITS, {"zone_id": zone_id, "unit_id": unit_id}, from_, to)
    return await page(ctx, request, q, cursor, limit, fmt)


@router.get(
    "/history/zone-periods",
    summary="Dosage per zone and shift, filtered by zone and shift start; keyset-paged",
    response_model=None,
    responses={200: {"model": PeriodPage, "content": _CSV}},
)
async def zone_periods(
    ctx: Ctx,
    _: HistoryCaller,
    request: Request,
    zone_id: ZoneId = None,
    from_: From = None,
    to: To = None,
    limit: Limit = None,
    cursor: Cursor = None,
    fmt: Format = None,
) -> Response:
    q = selection(PERIODS, {"zone_id": zone_id}, from_, to)
    return await page(ctx, request, q, cursor, limit, fmt)
