"""`dosewatch up`: one command brings the stack up, says `ready`, and leaves no process behind,
whether it is stopped with Ctrl-C or killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.common.embedded import EmbeddedError, EmbeddedKafka, EmbeddedProxy, free_port


def children(pid: int) -> set[int]:
    """Direct children, from /proc (the embedded broker and PostgreSQL)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def gone(pids: set[int], within_s: float = 10.0) -> bool:
    """Whether every one of `pids` has exited, waiting up to `within_s` for them."""
    deadline = time.monotonic() + within_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pids)


def up_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The embedded stack on ports of its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOSEWATCH_KAFKA_BOOTSTRAP", "DOSEWATCH_DATABASE_URL",
                        "DOSEWATCH_FETCH_MAX_WAIT_MS")}  # fmt: skip
    return (
        env
        | {
            "DOSEWATCH_EMBEDDED_KAFKA_PORT": str(free_port()),
            "DOSEWATCH_LOG_LEVEL": "WARNING",
            "DOSEWATCH_API_PORT": str(free_port()),
        }
        | (extra or {})
    )


def up_command(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dosewatch.cli", "up", "--state-dir", str(state), *args]


def start_up(
    state: Path, extra: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        up_command(state, *args), env=up_env(extra), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line and line.startswith("dosewatch ready"):
            return proc, lines
    proc.kill()
    raise AssertionError("".join(lines))


def finish(proc: subprocess.Popen[str], interrupt: bool = True) -> str:
    """Ctrl-C (unless it stops by itself), then what it printed. One that has not stopped
    in 30 s is killed, and the test fails, leaving nothing running."""
    if interrupt:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return out


@pytest.fixture
def state_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dosewatch-up-"))
    root.chmod(0o755)
    return root / "state"


STAGE_PROCESSES = pytest.mark.parametrize("args", [(), ("--processes",)], ids=["one", "processes"])


def _stage_kids(pid: int) -> set[int]:
    return {k for k in alive(children(pid))
            if b"dosewatch.cli" in Path(f"/proc/{k}/cmdline").read_bytes()}  # fmt: skip


@STAGE_PROCESSES
def test_up_ready_then_ctrl_c_stops_everything(state_dir: Path, args: tuple[str, ...]) -> None:
    proc, lines = start_up(state_dir, args=args)
    kids = children(proc.pid)
    # The broker, its proxy and PostgreSQL; and the stages, with --processes.
    assert len(alive(kids)) >= 3 + (3 if args else 0)
    assert len(_stage_kids(proc.pid)) == (3 if args else 0)
    # In pipeline order, though the stages start together.
    assert re.findall(r"(\w+) http://", lines[-1]) == ["ingest", "geofence", "dosage", "api"]
    # The API is up, and the development admin key it announces works.
    api = re.search(r"api (http://[0-9.:]+)", lines[-1])
    assert api is not None and "admin key in" in lines[-1]
    token = (state_dir / "admin.key").read_text().strip()
    assert (state_dir / "admin.key").stat().st_mode & 0o077 == 0
    r = httpx.get(f"{api.group(1)}/v1/zones/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and "zones" in r.json()
    assert httpx.get(f"{api.group(1)}/v1/zones/status").status_code == 401
    rest = finish(proc)
    assert proc.returncode == 0
    assert "dosewatch stopped" in rest
    assert not alive(kids)
    assert (state_dir / "pgdata" / "PG_VERSION").exists()  # the data stays for next time


@pytest.mark.parametrize(
    ("env", "wait", "partitions"),
    [({}, "50", 1), ({"DOSEWATCH_FETCH_MAX_WAIT_MS": "7", "DOSEWATCH_PARTITIONS": "3"}, "7", 3)],
)
def test_embedded_broker_gets_a_longer_fetch_wait_and_one_partition(
    state_dir: Path, env: dict[str, str], wait: str, partitions: int
) -> None:
    """On the embedded broker the services wait 50 ms for a fetch and make topics of one
    partition unless told otherwise: at 5 ms its idle polling is most of the stack's CPU, and
    its fetches cost more for every partition (docs/performance.md)."""
    port = free_port()
    proc, lines = start_up(state_dir, env | {"DOSEWATCH_EMBEDDED_KAFKA_PORT": str(port)})
    try:
        found = re.search(r"kafka [0-9.:]+ \(fetch wait (\d+) ms, (\d+) partitions?", lines[-1])
        assert found is not None and found.groups() == (wait, str(partitions))

        async def counts() -> list[int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
            await admin.start()
            try:
                topics = await admin.describe_topics()
            finally:
                await admin.close()
            return [len(t["partitions"]) for t in topics if t["topic"].endswith("pings")]

        assert asyncio.run(counts()) == [partitions]
    finally:
        finish(proc)


def test_a_second_up_says_why_it_cannot_start(state_dir: Path) -> None:
    """`dosewatch up` beside a running one: a message saying what is in the way and exit 1,
    with no traceback, and the running one is left as it was."""
    proc, lines = start_up(state_dir)
    try:
        port = re.search(r"kafka 127\.0\.0\.1:(\d+)", lines[-1])
        api = re.search(r"api (http://[0-9.:]+)", lines[-1])
        assert port is not None and api is not None
        # (what is in the way, the environment, whether its own broker had started)
        tries = [
            # The same broker port: the running broker would have answered for a new one.
            (f"port 127.0.0.1:{port.group(1)} is in use (Address already in use): another "
             "`dosewatch up` may be running; stop it, or set DOSEWATCH_EMBEDDED_KAFKA_PORT",
             {"DOSEWATCH_EMBEDDED_KAFKA_PORT": port.group(1)}, False),
            # Another port, the same state directory: its PostgreSQL is the running one's.
            ("is already running (pid", {}, True),
        ]  # fmt: skip
        for message, extra, started in tries:
            second = subprocess.run(up_command(state_dir), env=up_env(extra),
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            assert second.returncode == 1, second.stdout + second.stderr
            assert message in second.stderr
            assert "Traceback" not in second.stdout + second.stderr
            # What it started, it stops (and says so); having started nothing, it says nothing.
            assert ("dosewatch stopped" in second.stdout) == started
        assert proc.poll() is None
        token = (state_dir / "admin.key").read_text().strip()
        r = httpx.get(f"{api.group(1)}/v1/zones/status",
                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert r.status_code == 200
    finally:
        finish(proc)
    assert proc.returncode == 0


@STAGE_PROCESSES
def test_kill_9_leaves_no_orphans(state_dir: Path, args: tuple[str, ...]) -> None:
    proc, _ = start_up(state_dir, args=args)
    kids = alive(children(proc.pid))
    assert len(kids) >= 3 + (3 if args else 0)
    proc.kill()
    proc.wait()
    assert gone(kids)


@STAGE_PROCESSES
def test_up_rolls_its_broker_over_and_keeps_going(state_dir: Path, args: tuple[str, ...]) -> None:
    """Past DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_RECORDS in a partition, `dosewatch up` moves to a
    fresh broker: the demo's statuses keep coming through the same API, twice over, with
    nothing logged as an error; Ctrl-C during a rollover still stops it cleanly. The stages
    are moved in this process, or as processes through their control routes."""
    env = {
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_RECORDS": "60",
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_CHECK_S": "1",
        "DOSEWATCH_LOG_LEVEL": "INFO",
    }
    proc, lines = start_up(state_dir, env, ("--demo", "--speed", "10", *args))
    stages = _stage_kids(proc.pid)
    try:
        api = re.search(r"api (http://[0-9.:]+)", lines[-1])
        assert api is not None
        auth = {"Authorization": f"Bearer {(state_dir / 'admin.key').read_text().strip()}"}
        assert proc.stdout is not None
        rolled: list[str] = []
        deadline = time.monotonic() + 120
        while len(rolled) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "embedded broker rolled over" in line:
                rolled.append(line)
        assert len(rolled) == 2, "".join(lines[-30:])

        def newest() -> str:
            r = httpx.get(f"{api.group(1)}/v1/zones/status", headers=auth)
            return str(max(z["as_of"] for z in r.json()["zones"]))

        before = newest()
        deadline = time.monotonic() + 30
        while newest() == before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert newest() > before  # statuses still flow, after two rollovers
        metrics = httpx.get(f"{api.group(1)}/metrics").text
        done = re.search(r'dosewatch_embedded_broker_rollovers_total\{outcome="done"\} (\S+)',
                         metrics)  # fmt: skip
        assert done is not None and float(done.group(1)) >= 2
        # Stopped in the middle of a rollover: it finishes it, then stops in order.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "rolling the embedded broker over" in line:
                break
        else:
            raise AssertionError("no rollover began")
        assert _stage_kids(proc.pid) == stages  # moved, not started again
    finally:
        rest = finish(proc)
    assert proc.returncode == 0 and "dosewatch stopped" in rest
    problems = [x for x in lines + rest.splitlines()
                if '"level":"error"' in x or "Traceback" in x
                or "abandoned" in x]  # fmt: skip
    assert not problems, problems


async def _flood(bootstrap: str, prefix: str, count: int, rate: float) -> int:
    """`count` pings, each of its own unit, sent at `rate` by an ordinary producer; returns how
    many it had acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        acks = []
        started = time.monotonic()
        for i in range(count):
            ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            unit = f"{prefix}{i:06d}"
            doc = {"unit_id": unit, "ts": ts, "lat": 40.7, "lon": -74.0}
            acks.append(await producer.send("avl.pings.raw", orjson.dumps(doc),
                                            key=unit.encode()))  # fmt: skip
            if i % 50 == 49:
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
        results = await asyncio.gather(*acks, return_exceptions=True)
        return sum(not isinstance(r, BaseException) for r in results)
    finally:
        await producer.stop()


def test_an_outside_producer_loses_nothing_across_rollovers(state_dir: Path) -> None:
    """Clients outside the process reach the embedded broker through a proxy on the public
    port, which a rollover shuts before it reads what is left on the old broker: every ping
    a producer had acknowledged reaches the API, however fast it writes. (With the producer
    talking to the broker itself, this flood lost a batch of 100 in 1 of 2 runs.)"""
    env = {
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_RECORDS": "3000",
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_CHECK_S": "1",
    }
    proc, lines = start_up(state_dir, env)
    try:
        kafka = re.search(r"kafka ([0-9.:]+) ", lines[-1])
        api = re.search(r"api (http://[0-9.:]+)", lines[-1])
        assert kafka is not None and api is not None
        count = 100_000
        acked = asyncio.run(_flood(kafka.group(1), "OUT", count, 10_000))
        assert acked == count
        metrics = httpx.get(f"{api.group(1)}/metrics").text
        done = re.search(r'dosewatch_embedded_broker_rollovers_total\{outcome="done"\} (\S+)',
                         metrics)  # fmt: skip
        assert done is not None and float(done.group(1)) >= 1  # the flood met a rollover
        auth = {"Authorization": f"Bearer {(state_dir / 'dispatcher.key').read_text().strip()}"}
        seen = 0
        deadline = time.monotonic() + 90
        while seen < count and time.monotonic() < deadline:
            units = httpx.get(f"{api.group(1)}/v1/map/units", headers=auth, timeout=30)
            seen = sum(u["unit_id"].startswith("OUT") for u in units.json()["units"])
            time.sleep(1)
        assert seen == count
    finally:
        rest = finish(proc)
    assert proc.returncode == 0 and "Traceback" not in rest


def _child(pid: int, *words: bytes) -> int:
    """The direct child of `pid` whose command line holds every one of `words`."""
    for kid in alive(children(pid)):
        cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        if all(w in cmdline for w in words):
            return kid
    raise AssertionError(f"no child with {words}")


@pytest.mark.parametrize(
    ("words", "message"),
    [((b"tansu", b"broker"), "the embedded broker exited (killed by SIGKILL"),
     ((b"postgres", b"pgdata"), "the embedded PostgreSQL exited (killed by SIGKILL")],
)  # fmt: skip
def test_a_dead_broker_or_database_stops_up_saying_why(
    state_dir: Path, words: tuple[bytes, ...], message: str
) -> None:
    """Without its broker or its database the stack cannot go on: `dosewatch up` stops
    everything it started and says which died, instead of retrying against nothing (before,
    it logged about 300 connection errors a second and did not stop on Ctrl-C)."""
    proc, _ = start_up(state_dir)
    kids = alive(children(proc.pid))
    os.kill(_child(proc.pid, *words), signal.SIGKILL)
    out = finish(proc, interrupt=False)
    assert proc.returncode == 1
    assert message in out and "run `dosewatch up` again" in out
    assert "dosewatch stopped" in out
    # Nothing escaped uncaught (the clients' own logs of a lost server carry theirs inside).
    assert not [line for line in out.splitlines() if line.startswith("Traceback")]
    assert gone(kids)


def test_a_dead_stage_process_stops_up_saying_why(state_dir: Path) -> None:
    """A stage process that dies is not quietly carried on without: `dosewatch up` stops the
    rest and says which stage it was, as for the broker."""
    proc, _ = start_up(state_dir, args=("--processes",))
    kids = alive(children(proc.pid))
    os.kill(_child(proc.pid, b"dosewatch.cli", b"geofence"), signal.SIGKILL)
    out = finish(proc, interrupt=False)
    assert proc.returncode == 1
    assert "the geofence stage's process exited (killed by SIGKILL" in out
    assert "run `dosewatch up` again" in out and "dosewatch stopped" in out
    assert not [line for line in out.splitlines() if line.startswith("Traceback")]
    assert gone(kids)


def test_a_dead_proxy_is_started_again(state_dir: Path) -> None:
    """The proxy in front of the embedded broker holds nothing: killed, it is started again,
    and clients outside the process reach the broker as before."""
    proc, lines = start_up(state_dir)
    try:
        port = re.search(r"kafka 127\.0\.0\.1:(\d+)", lines[-1])
        assert port is not None
        first = _child(proc.pid, b"tansu", b"proxy")
        os.kill(first, signal.SIGKILL)

        async def topics() -> set[str]:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port.group(1)}")
            await admin.start()
            try:
                return set(await admin.list_topics())
            finally:
                await admin.close()

        deadline = time.monotonic() + 20
        while True:
            try:
                assert "avl.pings.raw" in asyncio.run(topics())
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert _child(proc.pid, b"tansu", b"proxy") != first
        assert proc.poll() is None
    finally:
        out = finish(proc)
    assert proc.returncode == 0
    assert "starting the embedded broker's proxy again" in "".join(lines) + out


def test_a_port_taken_says_what_to_do() -> None:
    """The broker's port was picked free, so only a race takes it: start again. The proxy's is
    the one set by DOSEWATCH_EMBEDDED_KAFKA_PORT, which the message names."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(EmbeddedError) as broker:
            EmbeddedKafka(port).claim()
        with pytest.raises(EmbeddedError) as proxy:
            EmbeddedProxy(port, "127.0.0.1:1").claim()
    assert str(broker.value).startswith(f"the embedded broker's port 127.0.0.1:{port} is in use")
    assert str(broker.value).endswith("another process took it since it was picked; start again")
    assert "DOSEWATCH_EMBEDDED_KAFKA_PORT" not in str(broker.value)
    assert str(proxy.value).startswith(f"the embedded broker's public port 127.0.0.1:{port}")
    assert "set DOSEWATCH_EMBEDDED_KAFKA_PORT to another port" in str(proxy.value)
