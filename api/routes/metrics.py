"""Prometheus metrics: queue depths and consumers per queue (read from RabbitMQ at each scrape) and, where the
processor runs in this process, job outcomes and durations per type."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import ADMIN
from api.services import Services
from contract.metrics import REGISTRY, record_queue_depths


@get("/metrics", summary="Prometheus metrics: queue depths, dead letters, job outcomes and durations", opt=ADMIN)
async def metrics(services: Services) -> Response[bytes]:
    await record_queue_depths(services.connection)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


ROUTES = [metrics]
