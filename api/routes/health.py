"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from litestar import Response, get

from api.services import Services

PROBE_TIMEOUT_SECONDS = 3


async def _probe(check: Awaitable[None]) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await check
    except TimeoutError:
        return f"error: no answer within {PROBE_TIMEOUT_SECONDS} s"
    except Exception as exc:
        return f"error: {exc}"
    return "ok"


@get("/healthz", summary="The server is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Ready to serve: broker connected, models loaded, storage and Qdrant answering")
async def readyz(services: Services) -> Response[dict[str, Any]]:
    checks: dict[str, str] = {}
    runtime = services.runtime
    checks["broker"] = "ok" if runtime.publisher.is_connected and services.replies.is_connected else "disconnected"
    if services.consumer is not None:
        checks["processor"] = "ok" if services.consumer.is_running else "stopped"
        if services.settings.image_enabled:
            checks["image_model"] = "ok" if runtime.generator is not None else "not loaded"
        if services.settings.voice_enabled:
            checks["voice_model"] = "ok" if runtime.voice is not None else "not loaded"
    checks["storage"] = await _probe(runtime.store.ping())
    if services.settings.image_search_enabled:
        checks["clip_model"] = "ok" if runtime.clip is not None else "not loaded"
        checks["qdrant"] = await _probe(runtime.index.ping()) if runtime.index is not None else "not opened"
    failing = sorted(name for name, state in checks.items() if state != "ok")
    body: dict[str, Any] = {"status": "ready" if not failing else "not_ready", "checks": checks}
    if failing:
        body["failing"] = failing
    return Response(body, status_code=200 if not failing else 503)


ROUTES = [healthz, readyz]
