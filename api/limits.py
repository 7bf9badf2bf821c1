"""Request limits that sit in front of the app: which Host a request may name (ALLOWED_HOSTS, 400) and how long
the server waits for the next piece of a request body (408). The request line and headers are limited while they
are parsed (infra/http_protocol.py), the body size per route by Litestar (request_max_body_size), the idle
keep-alive by uvicorn (HTTP_KEEPALIVE_SECONDS)."""

from __future__ import annotations

import asyncio
import json

from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send


class RequestLimits:
    """ASGI middleware: refuse a Host this server does not answer for, and time out a body that stalls."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        read_timeout: float,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self._allowed_hosts = {host.lower() for host in allowed_hosts}
        self._read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if self._allowed_hosts:
            host = next((value for name, value in headers if name == b"host"), b"").decode("latin-1")
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if hostname.lower() not in self._allowed_hosts:
                await _refuse(
                    send, 400, "invalid_host", f"this server does not answer for host {host[:100]!r} (ALLOWED_HOSTS)"
                )
                return
        body_done = False
        timeout = self._read_timeout

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    status_code=408,
                    detail=f"no part of the request body arrived for {timeout:g} s (HTTP_READ_TIMEOUT_SECONDS)",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"status": status, "code": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
