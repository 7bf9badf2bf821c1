"""The Litestar application."""

from __future__ import annotations

import time
from datetime import timedelta

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.stores.memory import MemoryStore

from api.auth import AccessGuard, rate_limit_identity
from api.body_check import check_body
from api.errors import EXCEPTION_HANDLERS
from api.features import FeatureGuard
from api.limits import RequestLimits
from api.openapi import finish_document, openapi_config, security
from api.options import options_handlers
from api.routes import OPEN_ROUTES, PAGE_ROUTES, ROUTES, VOICE_UPLOAD_ROUTES
from api.services import Services
from infra.settings import Settings

MULTIPART_OVERHEAD_BYTES = 1024 * 1024
# how often the rate limit's expired buckets are deleted (its window is a minute)
RATE_LIMIT_SWEEP_SECONDS = 60.0


class RateLimitStore(MemoryStore):
    """The rate limit's buckets, one per API key or client address. Litestar's MemoryStore deletes an expired entry
    only when its key is read again, so each client seen once kept its bucket for good (memory growing with the
    distinct addresses, which an IPv6 client can rotate): this one also deletes every expired entry on the first
    write `sweep_seconds` after its last sweep. The server runs without an ASGI lifespan (the caller opens and
    closes), so the writes, one per counted request, drive the sweep rather than a task of its own."""

    def __init__(self, sweep_seconds: float) -> None:
        super().__init__()
        self._sweep_seconds = sweep_seconds
        self._next_sweep = time.monotonic() + sweep_seconds

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        await super().set(key, value, expires_in)
        await self.sweep()

    async def sweep(self) -> None:
        """Delete the expired entries, unless the last sweep was less than `sweep_seconds` ago."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_seconds
        await self.delete_expired()


def _rate_limit(settings: Settings) -> list[DefineMiddleware]:
    """RATE_LIMIT_PER_MINUTE per API key (or per client address without one); health checks, the web page's own
    files and the embedded store's signed links (the download a redirect of the API already counted leads to: its
    signature is its credential) are not counted."""
    if not settings.rate_limit_per_minute:
        return []
    config = RateLimitConfig(
        rate_limit=("minute", settings.rate_limit_per_minute),
        exclude=["^/healthz$", "^/readyz$", "^/$", "^/ui/", "^/v1/files/"],
        identifier_for_request=rate_limit_identity(settings.api_keys),
    )
    return [config.middleware]


def _cors(settings: Settings) -> CORSConfig | None:
    """Browsers on CORS_ORIGINS may call the API (off by default: same-origin only)."""
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        expose_headers=[
            "Retry-After",
            "X-Seed",
            "X-Job-Id",
            "X-Next-Cursor",
            "X-Audio-Duration",
            "X-Thumbnail",
            "Location",
            "Link",
        ],
    )


def create_app(services: Services) -> Litestar:
    """The HTTP app over already-started services (the caller owns their lifetime)."""
    settings = services.settings
    # bodies are refused while streaming once past the file limit plus room for the multipart envelope
    guards = [AccessGuard(settings.api_keys), FeatureGuard(settings)]
    keyed = security(bool(settings.api_keys))
    voice_uploads = Router(
        "/",
        route_handlers=[*options_handlers(VOICE_UPLOAD_ROUTES), *VOICE_UPLOAD_ROUTES],
        request_max_body_size=settings.voice_max_ref_bytes + MULTIPART_OVERHEAD_BYTES,
        guards=guards,
        security=keyed,
    )
    # the OpenAPI document (/schema) stays open: it describes the API, it holds no data
    app = Litestar(
        route_handlers=[
            Router("/", route_handlers=[*options_handlers(OPEN_ROUTES), *OPEN_ROUTES], guards=guards),
            Router("/", route_handlers=[*options_handlers(PAGE_ROUTES), *PAGE_ROUTES], guards=guards),
            Router("/", route_handlers=[*options_handlers(ROUTES), *ROUTES], guards=guards, security=keyed),
            voice_uploads,
        ],
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        stores={"rate_limit": RateLimitStore(RATE_LIMIT_SWEEP_SECONDS)},
        middleware=[
            DefineMiddleware(
                RequestLimits,
                read_timeout=settings.http_read_timeout_seconds,
                allowed_hosts=settings.allowed_hosts,
            ),
            *_rate_limit(settings),
        ],
        before_request=check_body,
        request_max_body_size=settings.image_search_max_bytes + MULTIPART_OVERHEAD_BYTES,
        multipart_form_part_limit=32,
        openapi_config=openapi_config(bool(settings.api_keys)),
        logging_config=None,
        cors_config=_cors(settings),
    )
    finish_document(app, settings)
    return app
