"""`python -m api` / `ams-api`: the HTTP API, plus the processor in the same process when Qdrant is embedded.

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator

from infra.cpu import share_cpu_politely
from infra.logging import configure_logging
from infra.settings import Settings, SettingsError


async def serve(settings: Settings) -> None:
    import structlog
    import uvicorn

    from api.app import create_app
    from api.services import Services

    class Server(uvicorn.Server):
        """uvicorn re-raises a SIGTERM/SIGINT it caught once it has stopped serving, which ends the process before
        the services close (no graceful consumer stop, no last index backup). Here the signal only stops serving,
        then everything closes and the process exits with status 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

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
        await Server(config).serve()
    finally:
        await services.stop()


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
        asyncio.run(serve(settings))
    except (StartupError, ModelLoadError) as exc:
        sys.exit(f"start-up failed: {exc}")


if __name__ == "__main__":
    main()
