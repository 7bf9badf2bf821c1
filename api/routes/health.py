"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import Response, get

from api.auth import OPEN
from api.services import Services
from infra.readiness import readiness_body


@get("/healthz", summary="The server is up", opt=OPEN)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Ready to serve: what this process owns answers (broker, storage, models, index)", opt=OPEN)
async def readyz(services: Services) -> Response[dict[str, Any]]:
    body, status = readiness_body(await services.readiness())
    return Response(body, status_code=status)


ROUTES = [healthz, readyz]
