"""A stage of `dosewatch up --processes` run as a process of its own, as deployed.

In one process the three stages and the API share one core. As processes each stage can
have a core of its own, for more CPU in all (docs/performance.md, "Seventeenth round"). A
stage process is `dosewatch <stage>` with `up`'s settings in its environment, dying with
`up` (PR_SET_PDEATHSIG), logging to the same terminal, and moved at a rollover through its
control routes (`rollover.RemoteStage`).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import httpx

from services.common.embedded import ChildServer, EmbeddedError, die_with_parent, free_port


class StageProcessError(EmbeddedError):
    """A stage process did not start, or ended on its own: `up` says which and stops."""


class Launch(NamedTuple):
    """How `up` starts its stage processes."""

    env: dict[str, str]  # what they read their settings from
    control_token: str  # for their control routes, which a rollover calls


class StageProcess(ChildServer):
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.what = f"the {name} stage's process"
        self.port = free_port()
        self.env = env | {"DOSEWATCH_HTTP_PORT": str(self.port)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 120.0) -> None:
        """Until the stage answers /readyz (its state loaded, its consumer assigned)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dosewatch.cli", self.name, env=self.env,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM),
            start_new_session=True,  # Ctrl-C reaches `up`, which stops the stages in order
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while True:
                if self.proc.returncode is not None:
                    raise StageProcessError(f"{self.what} exited with {self.proc.returncode} "
                                            "while starting (its log is above)")  # fmt: skip
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    await self.stop()
                    raise StageProcessError(f"{self.what} was not ready in {timeout_s:.0f} s")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM: the stage saves its state and offsets and closes its clients."""
        await self._stop(signal.SIGTERM)
