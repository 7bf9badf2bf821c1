"""`python -m processor` / `ams-processor`: a processor alone, consuming the queues of its capabilities
(PROCESSOR_CAPABILITIES). With PROCESSOR_METRICS_PORT set it serves /healthz, /readyz and /metrics there.

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

import asyncio
import signal

from infra.entrypoint import run_service
from infra.settings import Settings


async def run(settings: Settings) -> None:
    from infra.http_server import check_port_free
    from infra.startup import StartupError

    if not settings.processor_capabilities:
        raise StartupError(
            "this processor has nothing to do: every feature is off (IMAGE_SEARCH_ENABLED, IMAGE_ENABLED, "
            "VOICE_ENABLED, CALLBACK_HOSTS) or PROCESSOR_CAPABILITIES lists none"
        )
    if settings.processor_metrics_port:
        try:
            check_port_free(settings.host, settings.processor_metrics_port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve health and metrics on {settings.host}:{settings.processor_metrics_port} "
                f"(PROCESSOR_METRICS_PORT; 0 turns it off): {exc}"
            ) from exc

    import structlog

    from infra.http_protocol import HttpLimits
    from infra.http_server import serve_until_signal
    from processor.health import create_health_app
    from processor.service import ProcessorService

    log = structlog.get_logger("processor")
    service = await ProcessorService.start(settings)
    try:
        if settings.processor_metrics_port:
            log.info("health_served", port=settings.processor_metrics_port, paths=["/healthz", "/readyz", "/metrics"])
            await serve_until_signal(
                create_health_app(service),
                settings.host,
                settings.processor_metrics_port,
                HttpLimits.from_settings(settings),
            )
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        log.info("shutdown_requested")
    finally:
        await service.stop()


def main() -> None:
    run_service(run)


if __name__ == "__main__":
    main()
