"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from api.auth import OPEN
from api.openapi import errors
from api.services import Services
from infra.readiness import readiness_body


@get("/healthz", summary="The server is up", opt=OPEN, responses=errors(open_route=True))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    summary="Ready to serve: what this process owns answers (broker, storage, models, index)",
    opt=OPEN,
    responses={
        HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
            dict[str, Any],
            description="Not ready: `failing` names the checks that are not ok, `checks` gives each one's state "
            "(the error behind it is logged, not shown)",
        ),
        **errors(open_route=True),
    },
)
async def readyz(services: Services) -> Response[dict[str, Any]]:
    checks = await services.readiness()
    services.readiness_log.record(checks)
    body, status = readiness_body(checks)
    return Response(body, status_code=status)


ROUTES = [healthz, readyz]
