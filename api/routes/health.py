"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import Response, get

from api.services import Services


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
    try:
        await runtime.store.ping()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {exc}"
    if services.settings.image_search_enabled:
        checks["clip_model"] = "ok" if runtime.clip is not None else "not loaded"
        try:
            if runtime.index is None:
                raise RuntimeError("not opened")
            await runtime.index.ping()
            checks["qdrant"] = "ok"
        except Exception as exc:
            checks["qdrant"] = f"error: {exc}"
    failing = sorted(name for name, state in checks.items() if state != "ok")
    body: dict[str, Any] = {"status": "ready" if not failing else "not_ready", "checks": checks}
    if failing:
        body["failing"] = failing
    return Response(body, status_code=200 if not failing else 503)


ROUTES = [healthz, readyz]
