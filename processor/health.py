"""The processor's own small HTTP surface (PROCESSOR_METRICS_PORT): /healthz, /readyz (what this processor owns:
broker, storage, consumer, models, index) and /metrics (job outcomes and durations; queue depths)."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract.metrics import REGISTRY, record_queue_depths
from infra.readiness import Checks, ReadinessLog, probe, readiness_body
from processor.service import ProcessorService


def create_health_app(service: ProcessorService) -> Litestar:
    plumbing = service.runtime.plumbing
    readiness_log = ReadinessLog()

    @get("/healthz", summary="The processor is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", summary="Ready to process: broker, storage, consumer, models and index")
    async def readyz() -> Response[dict[str, Any]]:
        checks: Checks = {
            "broker": plumbing.broker_state(),
            "storage": await probe(plumbing.store.ping()),
            **await service.readiness(),
        }
        readiness_log.record(checks)
        body, status = readiness_body(checks)
        return Response(body, status_code=status)

    @get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
    async def metrics() -> Response[bytes]:
        await record_queue_depths(plumbing.connection)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Litestar(route_handlers=[healthz, readyz, metrics], logging_config=None, openapi_config=None)
