"""`python -m processor` / `ams-processor`: run the consumer alone (two-process mode).

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from infra.cpu import share_cpu_politely
from infra.logging import configure_logging
from infra.settings import Settings, SettingsError


async def run(settings: Settings) -> None:
    import structlog

    from processor.runtime import Runtime
    from processor.service import build_consumer

    log = structlog.get_logger("processor")
    if settings.processor_metrics_port:
        from prometheus_client import start_http_server

        from contract.metrics import REGISTRY
        from processor.runtime import StartupError

        try:
            start_http_server(settings.processor_metrics_port, addr=settings.host, registry=REGISTRY)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {settings.host}:{settings.processor_metrics_port} "
                f"(PROCESSOR_METRICS_PORT; 0 turns it off): {exc}"
            ) from exc
        log.info("metrics_served", port=settings.processor_metrics_port, path="/metrics")
    runtime = await Runtime.open(settings)
    consumer = build_consumer(runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await consumer.start()
        await stop.wait()
        log.info("shutdown_requested")
        await consumer.stop()
    finally:
        await runtime.close()


def main() -> None:
    share_cpu_politely()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    from models.errors import ModelLoadError
    from processor.runtime import StartupError

    try:
        asyncio.run(run(settings))
    except (StartupError, ModelLoadError) as exc:
        sys.exit(f"start-up failed: {exc}")


if __name__ == "__main__":
    main()
