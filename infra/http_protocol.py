"""HTTP/1.1 limits enforced while the request head is parsed, before it is buffered whole.

uvicorn's httptools protocol has no limit on the request line, the header count or the header bytes: a 16 MB
header or 100,000 headers are read into memory before any ASGI code can refuse them, and input that is not HTTP
gets a plain-text 400. This protocol counts the bytes of each request head as they arrive and refuses, with the
API's JSON error body and `Connection: close`:
414 `uri_too_long` past HTTP_MAX_REQUEST_LINE_BYTES of request target, 431 `headers_too_large` past
HTTP_MAX_HEADERS headers or HTTP_MAX_HEADER_BYTES of head, 400 `bad_request` for what is not HTTP/1.1.

Nor does it time a request head: a connection that sends nothing, or a head a byte at a time, was held for good (a
few hundred such sockets took the server's file descriptors). Here a head must be whole within
HTTP_READ_TIMEOUT_SECONDS of its first byte, else 408 `request_timeout`; a new connection that sends nothing for
HTTP_KEEPALIVE_SECONDS is closed, as an idle keep-alive connection is.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infra.settings import Settings

log = structlog.get_logger(__name__)

# how long a refused connection is drained before it is closed
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class HttpLimits:
    max_request_line_bytes: int = 8190
    max_headers: int = 100
    max_header_bytes: int = 32 * 1024
    keepalive_seconds: int = 5
    head_timeout_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_request_line_bytes=settings.http_max_request_line_bytes,
            max_headers=settings.http_max_headers,
            max_header_bytes=settings.http_max_header_bytes,
            keepalive_seconds=settings.http_keepalive_seconds,
            head_timeout_seconds=settings.http_read_timeout_seconds,
        )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is over a limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of HttpLimits on each request head."""

    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._reading_head = True
        self._head_bytes = 0
        self._header_bytes = 0
        self._refusal: tuple[int, str, str] | None = None
        self._discarding = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._time_head(self._limits.keepalive_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timing_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._send_refusal(self._refusal or (400, "bad_request", "the request is not valid HTTP/1.1"))
            return
        # a header still being read is buffered by the parser before any callback sees it: count the raw bytes
        head_limit = self._limits.max_request_line_bytes + self._limits.max_header_bytes
        if self._reading_head and self._head_bytes > head_limit:
            self._send_refusal(self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._time_head(self._limits.head_timeout_seconds)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self._limits.max_request_line_bytes:
            self._refusal = (
                414,
                "uri_too_long",
                f"the request target is longer than {self._limits.max_request_line_bytes} bytes "
                "(HTTP_MAX_REQUEST_LINE_BYTES)",
            )
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value)
        if len(self.headers) > self._limits.max_headers or self._header_bytes > self._limits.max_header_bytes:
            self._refusal = self._too_large()
            raise _Refused

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._stop_timing_head()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0

    def _time_head(self, seconds: float) -> None:
        self._stop_timing_head()
        self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

    def _stop_timing_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._discarding or not self._reading_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request's head, read while the one before is answered: timed once that answer is out
            self._time_head(self._limits.head_timeout_seconds)
        elif self._head_bytes == 0:  # not a byte of a request yet: idle, closed as an idle keep-alive one is
            self.transport.close()
        else:
            self._send_refusal(
                (
                    408,
                    "request_timeout",
                    f"the request head did not arrive whole within {self._limits.head_timeout_seconds:g} s "
                    "(HTTP_READ_TIMEOUT_SECONDS)",
                )
            )

    def _too_large(self) -> tuple[int, str, str]:
        return (
            431,
            "headers_too_large",
            f"the request head is over this server's limits: at most {self._limits.max_headers} headers and "
            f"{self._limits.max_header_bytes} bytes of them (HTTP_MAX_HEADERS, HTTP_MAX_HEADER_BYTES)",
        )

    def _send_refusal(self, refusal: tuple[int, str, str]) -> None:
        status, code, message = refusal
        log.info("http_request_refused", status=status, code=code, client=self.client)
        body = json.dumps({"status": status, "code": code, "message": message}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        # a lingering close: closing with unread bytes from the client would reset the connection and could
        # destroy the answer on its way, so finish sending, then read and drop what still comes for a while
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._discarding = True
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
