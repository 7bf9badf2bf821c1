"""`python -m api` / `ams-api`: the HTTP API, plus the processor in the same process when Qdrant is embedded."""

from __future__ import annotations

import asyncio
import sys

import structlog
import uvicorn

from api.app import create_app
from api.services import Services
from infra.logging import configure_logging
from infra.settings import Settings, SettingsError
from processor.models.errors import ModelLoadError
from processor.runtime import StartupError

log = structlog.get_logger("api")


async def serve(settings: Settings) -> None:
    services = await Services.start(settings)
    config = uvicorn.Config(
        create_app(services),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    try:
        log.info("listening", host=settings.host, port=settings.port)
        await uvicorn.Server(config).serve()
    finally:
        await services.stop()


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (StartupError, ModelLoadError) as exc:
        sys.exit(f"start-up failed: {exc}")


if __name__ == "__main__":
    main()
