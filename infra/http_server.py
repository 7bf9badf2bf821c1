"""Serving an ASGI app under uvicorn until SIGTERM/SIGINT, then returning so the caller can close what it opened."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from infra.http_protocol import HttpLimits, LimitedHttpToolsProtocol


class _Server(uvicorn.Server):
    """uvicorn re-raises a SIGTERM/SIGINT it caught once it has stopped serving, which ends the process before
    the caller's clean-up runs (no graceful consumer stop, no last index backup). Here the signal only stops
    serving; the caller closes everything and the process exits with status 0. `stopping` is set as soon as the
    signal comes, before uvicorn waits for the requests in flight, so that requests which wait (a job's long
    poll) answer at once instead of holding the stop up."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event | None = None) -> None:
        super().__init__(config)
        self._stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping is not None:
            self._stopping.set()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def server_config(app: Any, host: str, port: int, limits: HttpLimits) -> uvicorn.Config:
    """uvicorn's settings for our apps: our logging, no access log, no lifespan (the caller opens and closes), and
    the request-head limits enforced while parsing (infra/http_protocol.py)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_keep_alive=limits.keepalive_seconds,
        http=functools.partial(LimitedHttpToolsProtocol, limits=limits),  # type: ignore[arg-type]
    )


async def serve_until_signal(
    app: Any, host: str, port: int, limits: HttpLimits, *, stopping: asyncio.Event | None = None
) -> None:
    """Serve `app` on host:port until the process is asked to stop; `stopping` is set when it is."""
    await _Server(server_config(app, host, port, limits), stopping).serve()


def check_port_free(host: str, port: int) -> None:
    """OSError, saying why, when nothing could listen on host:port (so start-up can refuse before it loads
    anything)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
