"""Access control: optional API keys with three levels, checked by one Litestar guard.

Each route names what it needs in its `opt` (ACCESS): `open` (health, signed file links, the OpenAPI document),
`read` (list, get, search, file redirects, job status), `write` (uploads, generation, voice, jobs) or `admin`
(delete, metrics). A key's level includes the ones below it. With no key configured (API_KEYS, API_KEYS_FILE)
every route is open, as before. Keys travel as `Authorization: Bearer <key>` and are compared by their SHA-256
digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

import structlog
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware.rate_limit import get_remote_address

from api.errors import ApiError
from infra.settings import ACCESS_LEVELS, ApiKey

log = structlog.get_logger(__name__)

ACCESS = "access"
OPEN = {ACCESS: "open"}
READ = {ACCESS: "read"}
WRITE = {ACCESS: "write"}
ADMIN = {ACCESS: "admin"}
_RANK = {level: rank for rank, level in enumerate(ACCESS_LEVELS)}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ai-model-server"'}


def _matching(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    """The key whose digest matches; every digest is compared, so the time does not say which one is close."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def rate_limit_identity(keys: tuple[ApiKey, ...]) -> Callable[[Request], str]:
    """Who a request counts against for RATE_LIMIT_PER_MINUTE: its API key when it presents a valid one, else its
    client address (an invalid key does not buy a fresh allowance), an IPv6 one by its /64."""

    def identify(request: Request) -> str:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if keys and scheme.lower() == "bearer" and (key := _matching(keys, presented.strip())) is not None:
            return f"key:{key.name}"
        return f"address:{client_network(get_remote_address(request))}"

    return identify


def client_network(address: str) -> str:
    """The network a client address counts as: an IPv6 client's /64 (a host gets a /64 and may take any address in
    it), an IPv4-mapped IPv6 address's IPv4 address, any other address itself."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class AccessGuard:
    """The guard: `(connection, handler)`, as Litestar calls it. Async on purpose: Litestar runs a sync guard in a
    worker thread, a hop that cost /healthz 100 ms at p99 while searches kept the threads busy."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = keys

    async def __call__(self, connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        needed = handler.opt.get(ACCESS)
        if needed is None:
            raise RuntimeError(f"route {handler} does not say what access it needs (api/auth.py)")
        if needed == "open" or not self._keys:
            return
        scheme, _, presented = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(
                401,
                "unauthorized",
                "this server needs an API key: send Authorization: Bearer <key>",
                headers=_CHALLENGE,
            )
        key = _matching(self._keys, presented.strip())
        if key is None:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers=_CHALLENGE)
        if _RANK[key.level] < _RANK[needed]:
            log.info("access_refused", key=key.name, level=key.level, needed=needed, path=connection.url.path)
            raise ApiError(403, "forbidden", f"this API key has {key.level} access; this needs {needed}")
