"""A server module (`python -m api`, `python -m launcher`) as its own process on a free port, ready to answer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.amqp import wait_until
from tests.support.rabbitmq import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class ServedProcess:
    process: subprocess.Popen[bytes]
    client: httpx.AsyncClient
    base_url: str
    env: dict[str, str]


@contextlib.asynccontextmanager
async def served_process(module: str, env: dict[str, str], log_path: Path) -> AsyncIterator[ServedProcess]:
    """Start the module with `env`, its output in `log_path`, and wait until /readyz answers 200. The process is
    killed on the way out unless the test stopped it itself."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=90, interval=0.2)
            yield ServedProcess(process, client, base_url, env)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
