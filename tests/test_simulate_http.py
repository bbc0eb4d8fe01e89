"""`dosewatch simulate --http` against an intake that is busy or restarting: the batch is
posted again until it is taken, and nothing is dropped; an address never reached is said at
once. Real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from dosewatch.simulate import SimulateError, _HttpSink
from services.common.embedded import free_port

PINGS = [{"unit_id": "U1", "ts": "2026-12-03T12:00:00Z", "lat": 40.7, "lon": -74.0}]


class Intake:
    """An HTTP server that answers each POST with the next of `answers` (status, headers),
    then 200, and keeps every body it was sent."""

    def __init__(self, port: int, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.bodies: list[bytes] = []
        intake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                intake.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers = answers.pop(0) if answers else (200, {})
                body = orjson.dumps({"accepted": 1, "rejected": []} if status == 200 else {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def test_a_busy_intake_gets_the_batch_again_until_it_takes_it(port: int) -> None:
    intake = Intake(port, [(503, {"Retry-After": "0"}), (429, {}), (503, {})])
    try:
        sink = _HttpSink(f"http://127.0.0.1:{port}")
        assert asyncio.run(sink.send(PINGS)) == 0
    finally:
        intake.close()
    assert sink.retries == 3
    assert intake.bodies == [orjson.dumps(PINGS)] * 4


def test_an_intake_that_restarts_is_waited_for(port: int) -> None:
    first = Intake(port, [])
    sink = _HttpSink(f"http://127.0.0.1:{port}")
    asyncio.run(sink.send(PINGS))
    first.close()  # refused from now on, until the next one listens
    later: list[Intake] = []
    timer = threading.Timer(0.8, lambda: later.append(Intake(port, [])))
    timer.start()
    try:
        assert asyncio.run(sink.send(PINGS)) == 0
    finally:
        timer.join()
        for intake in later:
            intake.close()
    assert sink.retries >= 1
    assert later[0].bodies == [orjson.dumps(PINGS)]


def test_an_intake_never_reached_is_said_at_once(port: int) -> None:
    sink = _HttpSink(f"http://127.0.0.1:{port}", retry_for_s=30)
    with pytest.raises(SimulateError, match="Connection refused"):
        asyncio.run(sink.send(PINGS))
    assert sink.retries == 0  # not tried again for 30 s


def test_an_intake_busy_for_too_long_is_given_up(port: int) -> None:
    intake = Intake(port, [(503, {"Retry-After": "0.2"})] * 100)
    try:
        sink = _HttpSink(f"http://127.0.0.1:{port}", retry_for_s=1.0)
        with pytest.raises(SimulateError, match=r"HTTP 503, still after 1 s"):
            asyncio.run(sink.send(PINGS))
    finally:
        intake.close()
    # Tried again, every 0.2 s as told, and no longer than the second it was given.
    assert 2 <= len(intake.bodies) <= 6


def test_other_errors_are_not_retried(port: int) -> None:
    intake = Intake(port, [(500, {})])
    try:
        sink = _HttpSink(f"http://127.0.0.1:{port}")
        with pytest.raises(SimulateError, match="HTTP 500"):
            asyncio.run(sink.send(PINGS))
    finally:
        intake.close()
    assert len(intake.bodies) == 1
