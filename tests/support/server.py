"""The real product (the one-process launcher + Litestar app under uvicorn) on a free port, inside the test's event
loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import uvicorn

from api.app import create_app
from api.services import Services
from infra.http_protocol import HttpLimits
from infra.http_server import server_config
from infra.settings import Settings
from launcher import OneProcess
from processor.service import ProcessorService


@dataclass
class RunningServer:
    base_url: str
    services: Services
    processor: ProcessorService | None
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def running_server(settings: Settings, *, with_processor: bool = True) -> AsyncIterator[RunningServer]:
    """The one-process mode (python -m launcher); with_processor=False: the API alone (python -m api)."""
    running = await OneProcess.start(settings, with_processor=with_processor)
    config = server_config(create_app(running.services), "127.0.0.1", 0, HttpLimits.from_settings(settings))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            yield RunningServer(base_url, running.services, running.processor, client)
    finally:
        running.services.stopping.set()  # as a SIGTERM does: long polls answer, so the server stops at once
        server.should_exit = True
        await task
        await running.stop()
