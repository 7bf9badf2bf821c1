"""OPTIONS answers that list every method of a path.

Litestar makes an OPTIONS handler per path as route handlers are registered, and the one made with a path's first
handler keeps answering with that handler's methods only (`GET, OPTIONS` for a path that also takes DELETE).
Registering these before the routes means Litestar never makes its own. CORS preflights are answered earlier, by
Litestar's CORS middleware (CORS_ORIGINS).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from litestar import Response, route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.status_codes import HTTP_204_NO_CONTENT

from api.auth import OPEN


def options_handlers(handlers: Sequence[HTTPRouteHandler]) -> list[HTTPRouteHandler]:
    """One OPTIONS handler per path of `handlers`, answering 204 with `Allow` naming all of that path's methods."""
    methods: dict[str, set[str]] = defaultdict(set)
    for handler in handlers:
        for path in handler.paths:
            methods[path] |= set(handler.http_methods)
    return [_options(path, sorted(allowed | {HttpMethod.OPTIONS})) for path, allowed in methods.items()]


def _options(path: str, allowed: list[str]) -> HTTPRouteHandler:
    allow = ", ".join(allowed)

    async def allowed_methods() -> Response[None]:
        return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": allow})

    return route(path, http_method=HttpMethod.OPTIONS, opt=OPEN, include_in_schema=False)(allowed_methods)
