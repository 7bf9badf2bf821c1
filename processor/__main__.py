"""`python -m processor` / `ams-processor`: run the consumer alone (two-process mode)."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog

from infra.logging import configure_logging
from infra.settings import Settings, SettingsError
from processor.models.errors import ModelLoadError
from processor.runtime import Runtime, StartupError
from processor.service import build_consumer

log = structlog.get_logger("processor")


async def run(settings: Settings) -> None:
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
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except (StartupError, ModelLoadError) as exc:
        sys.exit(f"start-up failed: {exc}")


if __name__ == "__main__":
    main()
