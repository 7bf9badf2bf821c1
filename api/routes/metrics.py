"""Prometheus metrics: queue depths and consumers per queue (read from RabbitMQ at each scrape) and, where the
processor runs in this process, job outcomes and durations per type."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import generate_latest

from api.auth import ADMIN
from api.openapi import errors
from api.services import Services
from contract.metrics import REGISTRY, record_queue_depths

# the Prometheus text format (Litestar adds the charset)
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


@get(
    "/metrics",
    summary="Prometheus metrics: queue depths, dead letters, job outcomes and durations",
    opt=ADMIN,
    media_type=PROMETHEUS_TEXT,
    responses=errors(),
)
async def metrics(services: Services) -> Response[str]:
    await record_queue_depths(services.connection)
    return Response(generate_latest(REGISTRY).decode(), media_type=PROMETHEUS_TEXT)


ROUTES = [metrics]
