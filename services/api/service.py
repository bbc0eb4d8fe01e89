"""The API service: `dosewatch api`. Serves REST and websockets on DOSEWATCH_API_PORT."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from services.api.app import create_app
from services.api.auth import Authenticator
from services.api.context import ApiContext
from services.api.core.statusbook import StatusBook
from services.api.live import LiveFeed
from services.api.settings import ApiSettings
from services.common import db
from services.common.http import HttpServer
from services.common.runner import run_service

log = logging.getLogger(__name__)


class ApiService:
    name = "api"

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.ctx: ApiContext | None = None
        self.feed: LiveFeed | None = None
        self.http: HttpServer | None = None

    async def start(self) -> None:
        s = self.settings
        self.pool = pool = await db.open_pool(s.database_url.get_secret_value(), 8)
        self.ctx = ApiContext(s, pool, Authenticator(s, pool),
                              StatusBook(keep=s.resume_buffer))  # fmt: skip
        # No permessage-deflate: it would compress each frame once per client (see api/ws.py).
        self.http = HttpServer(create_app(self.ctx), s.api_host, s.api_port,
                               ws_per_message_deflate=False)  # fmt: skip
        # Listening (health answers, /readyz says starting) while the feed catches up.
        await self.http.start()
        self.feed = LiveFeed(self.ctx)
        await self.feed.start()
        log.info("api ready", extra={"port": self.http.port, "zones": len(self.ctx.zones)})

    async def run(self) -> None:
        assert self.feed is not None
        await self.feed.run()

    async def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.ready = False
        if self.http is not None:
            await self.http.stop()
        if self.feed is not None:
            await self.feed.stop()
        if self.pool is not None:
            await self.pool.close()


async def main(settings: ApiSettings | None = None) -> None:
    await run_service(ApiService(settings or ApiSettings()))


if __name__ == "__main__":
    asyncio.run(main())
