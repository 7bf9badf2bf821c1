"""`python -m launcher` / `ams-server`: the API and a processor in one process (what scripts/run.sh starts).

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

from infra.entrypoint import run_service
from infra.settings import Settings


async def serve(settings: Settings) -> None:
    import structlog

    from api.app import create_app
    from infra.http_protocol import HttpLimits
    from infra.http_server import serve_until_signal
    from launcher import OneProcess

    running = await OneProcess.start(settings)
    try:
        structlog.get_logger("launcher").info("listening", host=settings.host, port=settings.port, processor="here")
        await serve_until_signal(
            create_app(running.services),
            settings.host,
            settings.port,
            HttpLimits.from_settings(settings),
            stopping=running.services.stopping,
        )
    finally:
        await running.stop()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
