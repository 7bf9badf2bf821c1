"""The HTTP client callbacks go out on: no redirects followed, no proxy from the environment, and (unless
CALLBACK_ALLOW_PRIVATE_ADDRESSES) connections to public addresses only.

CALLBACK_HOSTS says which host names a callback may name; what a name resolves to is up to whoever runs its DNS (a
`*.example.com` entry trusts everyone who may add names under it). So, as webhook senders such as GitLab and Gitea
do by default, a callback does not connect to a loopback, private, link-local (cloud metadata), shared or reserved
address, nor to an IPv6 address carrying one (NAT64 and the like: is_public). The host is resolved once, the
addresses checked, and the connection made to an address that passed: a DNS answer that changes between the check
and the connection (rebinding) cannot lead elsewhere. TLS still checks the certificate against the host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpcore
import httpx

from infra.settings import Settings

USER_AGENT = "ai-model-server-callbacks/1"


class AddressNotAllowedError(Exception):
    """The callback's host resolves to no public address (and private ones are not allowed)."""


# IPv6 addresses that carry an IPv4 address in their last 32 bits, and lead to it where a translator or the host
# takes them so: IPv4-mapped, IPv4-translated (SIIT), IPv4-compatible, and NAT64's well-known prefix, which DNS64
# answers with in IPv6-only networks (their NAT64 gateway then connects to the IPv4 address, a private one included)
_CARRYING_IPV4 = tuple(
    ipaddress.IPv6Network(network) for network in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96")
)
# not globally reachable, though ipaddress's is_global says so on some Python versions: the local-use NAT64 prefix
# (whatever IPv4 address its operator maps into it, private ones included) and the deprecated site-local addresses
_NOT_PUBLIC = tuple(ipaddress.IPv6Network(network) for network in ("64:ff9b:1::/48", "fec0::/10"))


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable. An IPv6 address carrying an IPv4 address (IPv4-mapped, NAT64,
    6to4 and the like) counts as that IPv4 address."""
    parsed: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address):
        if any(parsed in network for network in _NOT_PUBLIC):
            return False
        if parsed.sixtofour is not None:
            parsed = parsed.sixtofour
        elif any(parsed in network for network in _CARRYING_IPV4):
            parsed = ipaddress.IPv4Address(int(parsed) & 0xFFFFFFFF)
    return parsed.is_global and not parsed.is_multicast


class _PublicAddressesOnly(httpcore.AsyncNetworkBackend):
    """Connects to a host's public addresses only, resolved and checked here."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        public = [address for address in addresses if is_public(address)]
        if not public:
            raise AddressNotAllowedError(
                f"{host} resolves to {', '.join(addresses)}, not a public address; callbacks to private networks "
                "are off (CALLBACK_ALLOW_PRIVATE_ADDRESSES=1 turns them on)"
            )
        return await self._backend.connect_tcp(public[0], port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressNotAllowedError("callbacks do not go to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport, each answer awaited `deadline` seconds at most in all, over a connection pool that
    connects through `_PublicAddressesOnly` when `public_only`. httpx does not take a network backend, so the pool it
    builds is then replaced by one built the same way with the backend (a test sends a callback to a loopback
    receiver and sees it refused: it fails should the pool stop being this one)."""

    def __init__(self, limits: httpx.Limits, *, deadline: float, public_only: bool) -> None:
        super().__init__(limits=limits)
        self._deadline = deadline
        if public_only:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=_PublicAddressesOnly(),
            )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The answer's status and headers (its body is left unread). httpx's timeouts bound each read only, and a
        receiver that sends a little before each ends (interim 1xx answers, a header a byte at a time) would hold
        the POST, and a place in the callbacks' batches, for good."""
        try:
            async with asyncio.timeout(self._deadline):
                return await super().handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no answer within {self._deadline:g} s", request=request) from None


def open_client(settings: Settings) -> httpx.AsyncClient:
    """The client callbacks go out on: no redirects followed, CALLBACK_TIMEOUT_SECONDS for each phase and twice that
    for the whole POST (up to the answer's headers), no proxy from the environment (HTTP_PROXY and the like), public
    addresses only unless CALLBACK_ALLOW_PRIVATE_ADDRESSES."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.callback_timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
        limits=limits,
        transport=_Transport(
            limits,
            deadline=2 * settings.callback_timeout_seconds,
            public_only=not settings.callback_allow_private_addresses,
        ),
    )
