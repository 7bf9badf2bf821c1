"""`python -m api` / `ams-api`: the HTTP API alone. Processors run elsewhere (`python -m processor`); for the
one-process mode use `python -m launcher`.

Settings are checked before the model libraries are imported, so a bad value fails in a moment.
"""

from __future__ import annotations

from infra.entrypoint import run_service
from infra.settings import Settings


async def serve(settings: Settings) -> None:
    from infra.startup import Plumbing

    # the object store and the broker first: an unreachable one fails start-up before the model code is imported
    plumbing = await Plumbing.open(settings)
    try:
        import structlog

        from api.app import create_app
        from api.services import Services
        from infra.http_protocol import HttpLimits
        from infra.http_server import serve_until_signal

        services = await Services.start(settings, plumbing=plumbing)
        try:
            structlog.get_logger("api").info("listening", host=settings.host, port=settings.port, processor="elsewhere")
            await serve_until_signal(
                create_app(services),
                settings.host,
                settings.port,
                HttpLimits.from_settings(settings),
                stopping=services.stopping,
            )
        finally:
            await services.stop()
    finally:
        await plumbing.close()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
