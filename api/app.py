"""The Litestar application."""

from __future__ import annotations

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from api.errors import EXCEPTION_HANDLERS
from api.routes import ROUTES
from api.services import Services

MULTIPART_OVERHEAD_BYTES = 1024 * 1024


def create_app(services: Services) -> Litestar:
    """The HTTP app over already-started services (the caller owns their lifetime)."""
    settings = services.settings
    upload_limit = settings.image_search_max_bytes
    return Litestar(
        route_handlers=ROUTES,
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=upload_limit + MULTIPART_OVERHEAD_BYTES,
        multipart_form_part_limit=32,
        state={"upload_limit_bytes": upload_limit},  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(
            title="AI model server",
            version="0.1.0",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        logging_config=None,
    )
