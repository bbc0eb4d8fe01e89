"""`dosewatch simulate`: seeded patrol units on a street grid, sent as live AVL input.

The movement model is pure: the same seed and parameters give the same pings. Units drive
along N-S/E-W streets between waypoints (hot spots and random points), stop in hot spots for
varied times, and their fixes carry GPS jitter, dropouts, resends and the occasional bad fix.
`stream` is the thin I/O part: it sends the pings to Kafka or the HTTP intake, each stamped
with the wall time it is due at.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import shapely
from shapely.geometry import shape

from dosewatch.demo import CENTER_LAT, CENTER_LON
from schemas.timefmt import format_ts
from services.common.settings import CommonSettings
from services.dosage.core.params import DosageParams

_M_PER_DEG_LAT = 111_132.0

Fault = Literal["null_island", "far_jump", "out_of_range", "duplicate"]
BAD_FIXES: tuple[Fault, ...] = ("null_island", "far_jump", "out_of_range")
REFUSED: tuple[Fault, ...] = ("null_island", "out_of_range")  # invalid pings, by the contract


class SimulateError(Exception):
    """Bad parameters or an unreachable target: reported to the user."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The movement and noise model. Rates are per report unless named per hour."""

    drive_mps: tuple[float, float] = (8.0, 15.0)
    approach_mps: tuple[float, float] = (4.0, 8.0)  # off-street legs: into a plaza, a lot
    # Grid spacing (x: avenues, y: streets), Manhattan-like blocks.
    block_m: tuple[float, float] = (250.0, 80.0)
    hot_spot_share: float = 0.7  # waypoints that are hot spots; the rest are random points
    red_light_p: float = 0.2  # at each turn
    red_light_s: tuple[float, float] = (5.0, 45.0)
    # Hot-spot stops: pass-through, short, near the target, overstay beyond max visit.
    stop_weights: tuple[float, float, float, float] = (3.0, 2.0, 3.0, 1.5)
    params: DosageParams = field(default_factory=DosageParams)
    jitter_m: float = 3.0  # per-axis sigma of an ordinary fix
    accuracy_m: tuple[float, float] = (3.0, 12.0)
    spike_p: float = 0.02  # multipath: 30-80 m off, with an accuracy_m that says so
    spike_m: tuple[float, float] = (30.0, 80.0)
    dropout_per_hour: float = 1.0  # per unit: tunnels, dead modems
    dropout_s: tuple[float, float] = (60.0, 300.0)
    bad_fix_p: float = 0.002
    duplicate_p: float = 0.005  # AVL gateways resend
    motion_share: float = 0.8  # units whose devices report speed and heading


@dataclass(frozen=True, slots=True)
class SimFix:
    ts_ms: int
    ping: dict[str, Any]  # the wire form (schemas/ping.py), unless fault is "out_of_range"
    fault: Fault | None = None
    zone_id: str | None = None  # ground truth: the hot spot the unit is stopped at


@dataclass(frozen=True, slots=True)
class _Spot:
    zone_id: str
    x: float  # where units park: inside the polygon, away from its edge
    y: float
    radius: float
    min_visit_s: float
    target_s: float
    max_visit_s: float


@dataclass(frozen=True, slots=True)
class _City:
    lon0: float
    lat0: float
    spots: tuple[_Spot, ...]
    box: tuple[float, float, float, float]  # minx, miny, maxx, maxy in local metres

    def to_lonlat(self, x: float, y: float) -> tuple[float, float]:
        return (
            self.lon0 + x / (_M_PER_DEG_LAT * math.cos(math.radians(self.lat0))),
            self.lat0 + y / _M_PER_DEG_LAT,
        )


@dataclass(frozen=True, slots=True)
class _Leg:
    """A straight drive or (x0, y0 == x1, y1) a stop; legs chain end to start."""

    x0: float
    y0: float
    x1: float
    y1: float
    dur_ms: int
    mps: float
    zone_id: str | None = None


def simulate(
    seed: int,
    features: Sequence[Mapping[str, Any]],
    units: int,
    start_ms: int,
    *,
    interval_s: float = 5.0,
    end_ms: int | None = None,
    config: SimConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Ping dicts in time order across units, from `start_ms` until `end_ms` (or forever)."""
    for fix in simulate_fixes(
        seed, features, units, start_ms, interval_s=interval_s, end_ms=end_ms, config=config
    ):
        yield fix.ping


def simulate_fixes(
    seed: int,
    features: Sequence[Mapping[str, Any]],
    units: int,
    start_ms: int,
    *,
    interval_s: float = 5.0,
    end_ms: int | None = None,
    config: SimConfig | None = None,
) -> Iterator[SimFix]:
    """As `simulate`, with each ping's injected fault and ground truth.

    Each unit draws from its own seeded streams, so adding units leaves the others' tracks
    unchanged, and positions depend on time since `start_ms` only."""
    if interval_s <= 0:
        raise SimulateError("the report interval must be positive")
    cfg = config or SimConfig()
    city = _city(features, cfg.params)
    step_ms = max(1, round(interval_s * 1000))
    tracks = [_unit_fixes(seed, u, city, cfg, start_ms, end_ms, step_ms) for u in range(units)]
    for _t, _u, fix in heapq.merge(*tracks, key=lambda item: (item[0], item[1])):
        yield fix


def _unit_fixes(
    seed: int, u: int, city: _City, cfg: SimConfig, start_ms: int, end_ms: int | None, step_ms: int
) -> Iterator[tuple[int, int, SimFix]]:
    # Movement and noise draw from separate streams: changing a noise rate keeps the routes.
    move = random.Random(f"{seed}/{u}/move")
    noise = random.Random(f"{seed}/{u}/noise")
    unit_id = f"sim-{u:04d}"
    minx, miny, maxx, maxy = city.box
    legs = _plan(move, city, cfg, move.uniform(minx, maxx), move.uniform(miny, maxy))
    leg, leg_start = next(legs), start_ms
    motion = noise.random() < cfg.motion_share
    dropout_p = cfg.dropout_per_hour * step_ms / 3_600_000
    t = start_ms + noise.randrange(step_ms)  # units do not report in lockstep
    silent_until = t
    while end_ms is None or t < end_ms:
        while t >= leg_start + leg.dur_ms:
            leg_start += leg.dur_ms
            leg = next(legs)
        if t >= silent_until:
            if noise.random() < dropout_p:
                silent_until = t + round(noise.uniform(*cfg.dropout_s) * 1000)
            else:
                f = (t - leg_start) / leg.dur_ms
                x, y = leg.x0 + f * (leg.x1 - leg.x0), leg.y0 + f * (leg.y1 - leg.y0)
                fix = _fix(noise, city, cfg, unit_id, t, x, y, leg, motion)
                yield t, u, fix
                # Resends of good fixes only: each bad fix is counted once.
                if noise.random() < cfg.duplicate_p and fix.fault is None:
                    yield t, u, SimFix(t, dict(fix.ping), "duplicate", fix.zone_id)
        # A few per cent of jitter on the interval, as real devices have.
        t += step_ms + noise.randint(-step_ms // 20, step_ms // 20)


def _fix(
    rng: random.Random,
    city: _City,
    cfg: SimConfig,
    unit_id: str,
    t: int,
    x: float,
    y: float,
    leg: _Leg,
    motion: bool,
) -> SimFix:
    ex, ey = rng.gauss(0.0, cfg.jitter_m), rng.gauss(0.0, cfg.jitter_m)
    accuracy = rng.uniform(*cfg.accuracy_m)
    if rng.random() < cfg.spike_p:
        off, angle = rng.uniform(*cfg.spike_m), rng.uniform(0.0, 2 * math.pi)
        ex, ey = off * math.cos(angle), off * math.sin(angle)
        accuracy = off * rng.uniform(1.2, 2.5)
    lon, lat = city.to_lonlat(x + ex, y + ey)
    ping: dict[str, Any] = {"unit_id": unit_id, "ts": format_ts(t),
                            "lat": round(lat, 7), "lon": round(lon, 7)}  # fmt: skip
    if motion:
        if leg.mps > 0:
            ping["speed_mps"] = round(max(0.0, leg.mps + rng.gauss(0.0, 0.5)), 1)
            bearing = math.degrees(math.atan2(leg.x1 - leg.x0, leg.y1 - leg.y0))
            ping["heading_deg"] = round(bearing + rng.gauss(0.0, 2.0), 1) % 360.0
        else:
            ping["speed_mps"] = round(abs(rng.gauss(0.0, 0.2)), 1)
    ping["accuracy_m"] = round(accuracy, 1)
    fault: Fault | None = None
    if rng.random() < cfg.bad_fix_p:
        fault = rng.choice(BAD_FIXES)
        if fault == "null_island":  # a receiver without a fix: ingest must dead-letter it
            ping["lat"], ping["lon"] = 0.0, 0.0
        elif fault == "far_jump":  # a confident fix kilometres away
            off, angle = rng.uniform(5_000.0, 50_000.0), rng.uniform(0.0, 2 * math.pi)
            lon, lat = city.to_lonlat(x + off * math.cos(angle), y + off * math.sin(angle))
            ping["lat"], ping["lon"] = round(lat, 7), round(lon, 7)
        else:  # outside WGS84: ingest must dead-letter it
            name, limit = rng.choice((("lat", 90.0), ("lon", 180.0)))
            ping[name] = rng.choice((-1, 1)) * round(limit + rng.uniform(0.5, 20.0), 7)
    return SimFix(t, ping, fault, leg.zone_id)


def _plan(rng: random.Random, city: _City, cfg: SimConfig, x: float, y: float) -> Iterator[_Leg]:
    """A unit's endless sequence of legs: drive to a waypoint, maybe stop, repeat."""
    minx, miny, maxx, maxy = city.box
    here: _Spot | None = None
    while True:
        spot: _Spot | None = None
        if city.spots and rng.random() < cfg.hot_spot_share:
            # The nearest of a few candidates: patrols favour nearby hot spots.
            others = [s for s in city.spots if s is not here] or list(city.spots)
            picks = rng.sample(others, min(3, len(others)))
            spot = min(picks, key=lambda s: abs(s.x - x) + abs(s.y - y))
            r, a = spot.radius * math.sqrt(rng.random()), rng.uniform(0.0, 2 * math.pi)
            gx, gy = spot.x + r * math.cos(a), spot.y + r * math.sin(a)
        else:
            gx, gy = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        yield from _drive(rng, cfg, x, y, gx, gy)
        x, y, here = gx, gy, spot
        if spot is not None:
            dwell_s = _dwell_s(rng, cfg, spot)
        else:  # a traffic stop, a call for service, or straight on
            dwell_s = rng.uniform(30.0, 300.0) if rng.random() < 0.3 else 0.0
        if dwell_s > 0:
            zone_id = spot.zone_id if spot is not None else None
            yield _Leg(x, y, x, y, round(dwell_s * 1000), 0.0, zone_id)


def _dwell_s(rng: random.Random, cfg: SimConfig, spot: _Spot) -> float:
    kind = rng.choices(range(4), cfg.stop_weights)[0]
    if kind == 0:  # pass-through: well under the minimum visit, even counting the drive in
        return rng.uniform(0.0, 0.25 * spot.min_visit_s)
    if kind == 1:
        return rng.uniform(spot.min_visit_s + 30.0, max(spot.min_visit_s + 60.0,
                                                        0.6 * spot.target_s))  # fmt: skip
    if kind == 2:  # near the target, under the maximum
        return rng.uniform(0.85 * spot.target_s, min(1.2 * spot.target_s, 0.95 * spot.max_visit_s))
    return rng.uniform(1.1, 1.6) * spot.max_visit_s


def _drive(
    rng: random.Random, cfg: SimConfig, x0: float, y0: float, x1: float, y1: float
) -> Iterator[_Leg]:
    """Off-street to the nearest street, a staircase of N-S/E-W streets, and off-street again."""
    bx, by = cfg.block_m
    a, a_vertical = _onto_street(x0, y0, bx, by)
    b, b_vertical = _onto_street(x1, y1, bx, by)
    ia = _corner(a, a_vertical, b, bx, by)
    ib = _corner(b, b_vertical, a, bx, by)
    # 1-3 turns between the corners, on grid lines between them (monotone: no detours).
    turns = rng.randint(1, 3)
    xs = [*_between(rng, ia[0], ib[0], bx, turns - 1), ib[0]]
    ys = [*_between(rng, ia[1], ib[1], by, turns - 1), ib[1]]
    n = max(len(xs), len(ys))
    xs += [xs[-1]] * (n - len(xs))
    ys += [ys[-1]] * (n - len(ys))
    grid: list[tuple[float, float]] = []
    cx, cy = ia
    x_first = rng.random() < 0.5
    for gx, gy in zip(xs, ys, strict=True):
        if x_first:
            grid += [(gx, cy), (gx, gy)]
        else:
            grid += [(cx, gy), (gx, gy)]
        cx, cy = gx, gy
    path = [(x0, y0), a, ia, *grid, ib, b, (x1, y1)]
    points = [path[0]]
    for p in path[1:]:
        if abs(p[0] - points[-1][0]) + abs(p[1] - points[-1][1]) > 0.01:
            points.append(p)
    last = len(points) - 2
    for i, (p, q) in enumerate(itertools.pairwise(points)):
        street = 0 < i < last
        mps = rng.uniform(*(cfg.drive_mps if street else cfg.approach_mps))
        dist = abs(q[0] - p[0]) + abs(q[1] - p[1])
        yield _Leg(p[0], p[1], q[0], q[1], max(1, round(dist / mps * 1000)), mps)
        if street and i < last - 1 and rng.random() < cfg.red_light_p:
            yield _Leg(q[0], q[1], q[0], q[1], round(rng.uniform(*cfg.red_light_s) * 1000), 0.0)


def _onto_street(x: float, y: float, bx: float, by: float) -> tuple[tuple[float, float], bool]:
    """The nearest street point, and whether that street runs N-S."""
    vx, hy = round(x / bx) * bx, round(y / by) * by
    if abs(x - vx) <= abs(y - hy):
        return (vx, y), True
    return (x, hy), False


def _corner(
    p: tuple[float, float], vertical: bool, toward: tuple[float, float], bx: float, by: float
) -> tuple[float, float]:
    """The intersection along p's street on the side facing `toward`."""
    if vertical:
        f = math.ceil if toward[1] >= p[1] else math.floor
        return p[0], f(p[1] / by) * by
    f = math.ceil if toward[0] >= p[0] else math.floor
    return f(p[0] / bx) * bx, p[1]


def _between(rng: random.Random, a: float, b: float, block: float, k: int) -> list[float]:
    lo, hi = sorted((round(a / block), round(b / block)))
    lines = [i * block for i in range(lo + 1, hi)]
    picked = sorted(rng.sample(lines, min(k, len(lines))))
    return picked if b >= a else picked[::-1]


def _city(features: Sequence[Mapping[str, Any]], params: DosageParams) -> _City:
    shapes = [(f, shape(f["geometry"])) for f in features]
    if shapes:
        lon0 = sum(g.centroid.x for _, g in shapes) / len(shapes)
        lat0 = sum(g.centroid.y for _, g in shapes) / len(shapes)
    else:
        lon0, lat0 = CENTER_LON, CENTER_LAT
    kx = _M_PER_DEG_LAT * math.cos(math.radians(lat0))

    def local(lonlat: Any) -> Any:
        return (lonlat - (lon0, lat0)) * (kx, _M_PER_DEG_LAT)

    spots = []
    bounds = [-3000.0, -3000.0, 3000.0, 3000.0] if not shapes else [math.inf] * 2 + [-math.inf] * 2
    for feature, geom in shapes:
        poly = shapely.transform(geom, local)
        if poly.geom_type == "MultiPolygon":
            poly = max(poly.geoms, key=lambda g: g.area)
        point = poly.centroid if poly.contains(poly.centroid) else poly.representative_point()
        props = feature.get("properties") or {}
        max_visit = float(props.get("max_visit_s") or params.max_visit_s)
        target = min(float(props.get("target_s") or params.target_s), max_visit)
        spots.append(
            _Spot(
                zone_id=str(props.get("zone_id") or feature.get("id")),
                x=point.x,
                y=point.y,
                radius=min(25.0, 0.4 * poly.exterior.distance(point)),
                min_visit_s=float(props.get("min_visit_s") or params.min_visit_s),
                target_s=target,
                max_visit_s=max_visit,
            )
        )
        minx, miny, maxx, maxy = poly.bounds
        bounds = [min(bounds[0], minx), min(bounds[1], miny),
                  max(bounds[2], maxx), max(bounds[3], maxy)]  # fmt: skip
    margin = 300.0
    box = (bounds[0] - margin, bounds[1] - margin, bounds[2] + margin, bounds[3] + margin)
    return _City(lon0, lat0, tuple(spots), box)


# -- I/O: sending ----------------------------------------------------------------------------


@dataclass(slots=True)
class SimStats:
    units: int
    start_ms: int  # wall time of the simulation's start; pings are stamped from it
    sent: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    rejected: int = 0  # HTTP only: pings the intake refused
    seconds: float = 0.0

    @property
    def bad_fixes(self) -> int:
        return sum(self.faults[k] for k in BAD_FIXES)

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{k.replace('_', ' ')} {self.faults[k]}" for k in BAD_FIXES)
        refused = f"; intake refused {self.rejected}" if self.rejected else ""
        return (
            f"simulated {self.units} units for {self.seconds:.1f} s: sent {self.sent} pings "
            f"({rate:.1f}/s); bad fixes injected {self.bad_fixes} ({kinds}), "
            f"duplicates {self.faults['duplicate']}{refused}"
        )


async def stream(
    settings: CommonSettings,
    features: Sequence[Mapping[str, Any]],
    *,
    seed: int = 7,
    units: int = 25,
    rate: float = 20.0,
    interval_s: float | None = None,
    speed: float = 1.0,
    duration_s: float | None = None,
    http_url: str | None = None,
    config: SimConfig | None = None,
    stop_event: asyncio.Event | None = None,
    gate: asyncio.Lock | None = None,
) -> SimStats:
    """Send simulated patrols to `settings.topic_raw` (keyed by unit) or, with `http_url`, to
    the HTTP intake, until `duration_s` of wall time passes or `stop_event` is set.

    `rate` is pings per second overall; `interval_s`, if given, is each unit's report interval
    instead. Both are wall time. `speed` compresses the patrols: each ping is stamped with the
    wall time it is sent at (ingest refuses future timestamps), so at speed 10 a 15-minute stop
    lasts 90 s on the clock.

    Each send holds `gate`, if given: whoever takes it (a broker rollover, while it starts
    the proxy again) holds the pings back, and they go out afterwards with the times they
    were made at."""
    if units < 1 or speed <= 0 or rate <= 0 or (interval_s is not None and interval_s <= 0):
        raise SimulateError("units, rate, interval and speed must be positive")
    wall_interval = interval_s if interval_s is not None else units / rate
    start_ms = int(time.time() * 1000)
    end_ms = None if duration_s is None else start_ms + round(duration_s * speed * 1000)
    fixes = simulate_fixes(seed, features, units, start_ms, interval_s=wall_interval * speed,
                           end_ms=end_ms, config=config)  # fmt: skip
    stats = SimStats(units, start_ms)
    sink = _HttpSink(http_url) if http_url else _KafkaSink(settings)
    t0 = time.monotonic()
    batch: list[dict[str, Any]] = []
    try:
        await sink.start()
        for fix in fixes:
            offset_ms = (fix.ts_ms - start_ms) / speed
            wait = offset_ms / 1000 - (time.monotonic() - t0)
            # Send what is due before waiting for the next; a send takes a round trip, so at
            # high rates batches grow by themselves.
            if wait > 0 or len(batch) >= 1000:
                stats.rejected += await _send(sink, batch, gate)
                batch = []
                wait = offset_ms / 1000 - (time.monotonic() - t0)
                if wait > 0:
                    if stop_event is None:
                        await asyncio.sleep(wait)
                    elif await _stopped(stop_event, wait):
                        break
            if stop_event is not None and stop_event.is_set():
                break
            ping = dict(fix.ping)
            ping["ts"] = format_ts(start_ms + round(offset_ms))
            batch.append(ping)
            stats.sent += 1
            if fix.fault is not None:
                stats.faults[fix.fault] += 1
        stats.rejected += await _send(sink, batch, gate)
    finally:
        stats.seconds = time.monotonic() - t0
        await sink.stop()
    return stats


async def _stopped(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _send(sink: _KafkaSink | _HttpSink, batch: list[dict[str, Any]],
                gate: asyncio.Lock | None) -> int:  # fmt: skip
    if gate is None:
        return await sink.send(batch)
    async with gate:
        return await sink.send(batch)


class _KafkaSink:
    def __init__(self, settings: CommonSettings) -> None:
        from services.common import kafka

        self._settings = settings
        self._kafka = kafka
        self._producer = kafka.producer(settings)
        self._out = kafka.BatchProducer(self._producer)

    async def start(self) -> None:
        s = self._settings
        try:
            await self._kafka.ensure_topics(s, {s.topic_raw: {}})
            await self._producer.start()
        except Exception as exc:  # aiokafka's connection errors share no useful base
            raise SimulateError(f"cannot reach Kafka at {s.kafka_bootstrap}: {exc}") from None

    async def send(self, pings: list[dict[str, Any]]) -> int:
        if pings:
            records = ((p["unit_id"].encode(), orjson.dumps(p)) for p in pings)
            await self._out.send(self._settings.topic_raw, records)
        return 0

    async def stop(self) -> None:
        await self._producer.stop()


class _HttpSink:
    """POST /v1/pings with JSON arrays. urllib in a thread: no HTTP client at run time.

    An intake that was reached once and then refuses or answers 503/429 is restarting or
    busy: the batch is posted again until it is taken, for up to `retry_for_s`, so no ping is
    dropped on the way. A first contact that fails is a wrong address, said at once."""

    def __init__(self, url: str, retry_for_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SimulateError(f"--http {url!r}: expected http(s)://host[:port][/v1/pings]")
        if parts.path in ("", "/"):
            url = urllib.parse.urlunsplit(parts._replace(path="/v1/pings"))
        self.url = url
        self.retry_for_s = retry_for_s
        self.retries = 0
        self._reached = False

    async def start(self) -> None:
        pass

    async def send(self, pings: list[dict[str, Any]]) -> int:
        if not pings:
            return 0
        return await asyncio.to_thread(self._post, orjson.dumps(pings))

    def _post(self, body: bytes) -> int:
        """The pings the intake rejected (422 when it rejected them all: none lost)."""
        deadline = time.monotonic() + self.retry_for_s
        backoff = 0.1
        while True:
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = orjson.loads(response.read())
                self._reached = True
                return len(answer.get("rejected", []))
            except urllib.error.HTTPError as exc:
                if exc.code == 422:
                    return len(orjson.loads(exc.read()).get("rejected", []))
                if exc.code not in (429, 503):
                    raise SimulateError(
                        f"{self.url}: HTTP {exc.code} {exc.read()[:200]!r}"
                    ) from None
                why, wait = (
                    f"HTTP {exc.code}",
                    _retry_after(exc.headers.get("Retry-After"), backoff),
                )
            except (urllib.error.URLError, OSError) as exc:
                if not self._reached:
                    raise SimulateError(f"{self.url}: {exc}") from None
                why, wait = str(exc), backoff
            if time.monotonic() + wait > deadline:
                raise SimulateError(f"{self.url}: {why}, still after {self.retry_for_s:.0f} s")
            self.retries += 1
            time.sleep(wait)
            backoff = min(backoff * 2, 2.0)

    async def stop(self) -> None:
        pass


def _retry_after(header: str | None, default: float) -> float:
    """Retry-After in seconds; the HTTP-date form is not sent by dosewatch and counts as absent."""
    try:
        return max(0.0, float(header)) if header is not None else default
    except ValueError:
        return default


async def import_city(settings: CommonSettings, features: Sequence[Mapping[str, Any]]) -> int:
    """Upsert the simulated city's zones into PostgreSQL (migrating first): zones written."""
    import asyncpg

    from services.common import db
    from services.common.zonestore import import_zones

    url = settings.database_url.get_secret_value()
    try:
        await db.ensure_database(url)
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SimulateError(f"cannot reach PostgreSQL: {exc}") from None
    try:
        await db.migrate(conn)
        written, errors = await import_zones(
            conn, {"type": "FeatureCollection", "features": list(features)}
        )
    finally:
        await conn.close()
    if errors:
        raise SimulateError("invalid zones, nothing written: " + "; ".join(errors[:3]))
    return written
