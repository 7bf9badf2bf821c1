"""`python -m api` / `ams-api`: the HTTP API, plus the processor in the same process when Qdrant is embedded.

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

import asyncio
import sys

from infra.logging import configure_logging
from infra.settings import Settings, SettingsError


async def serve(settings: Settings) -> None:
    import structlog
    import uvicorn

    from api.app import create_app
    from api.services import Services

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
        structlog.get_logger("api").info("listening", host=settings.host, port=settings.port)
        await uvicorn.Server(config).serve()
    finally:
        await services.stop()


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    from processor.models.errors import ModelLoadError
    from processor.runtime import StartupError

    try:
        asyncio.run(serve(settings))
    except (StartupError, ModelLoadError) as exc:
        sys.exit(f"start-up failed: {exc}")


if __name__ == "__main__":
    main()
