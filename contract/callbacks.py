"""HTTP callbacks: a job's end POSTed to the URL its client gave (`callback_url` on POST /v1/jobs).

Whoever announces a job's end (contract/events.py) also publishes, for a job with a callback URL, a `job.callback`
message to ams.jobs: the URL and the job.finished event. A processor serving the `callback` capability (queue
ams.callback) POSTs the event to the URL, signed as Standard Webhooks (standardwebhooks.com) signs: headers
`webhook-id` (the event id, the same on every try), `webhook-timestamp` (Unix seconds) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, one per key of CALLBACK_SECRET). A callback may come more
than once (at least once, like the events): receivers drop repeats by `webhook-id`.

Callbacks go only to hosts listed in CALLBACK_HOSTS, checked when the job is started and again before each POST, so
that neither a client nor a message from upstream makes the server call an address it was not meant to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from contract.events import JobFinishedV1
from infra.broker import Priority, Publisher
from infra.settings import is_host

JOB_CALLBACK = "job.callback"
MAX_URL_CHARS = 2048
CALLBACK_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://"
_DEFAULT_PORTS = {"http": 80, "https": 443}

CallbackUrl = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_URL_CHARS,
        pattern=CALLBACK_URL_PATTERN,
        description="an http or https URL on a host that CALLBACK_HOSTS allows",
    ),
]


class JobCallbackV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST a job's end to a URL: `event` (job.finished v1, as ams.events announces it) is the request's body.

    The message id is the event id. A 2xx answer delivers it; 408, 425, 429, a 5xx, a timeout or a connection
    failure is retried through the retry queues (MAX_ATTEMPTS in all); any other answer, or a URL whose host
    CALLBACK_HOSTS does not allow, dead-letters it (callback_refused, callback_not_allowed) for an operator to replay.
    """

    version: Literal[1] = 1
    url: CallbackUrl
    event: JobFinishedV1


class CallbackUrlError(ValueError):
    """A callback URL that is not allowed, saying why."""


def check_callback_url(url: str, hosts: tuple[str, ...]) -> str:
    """The URL, if a callback may go to it: http or https, no user name or password, no fragment, and a host that
    an entry of `hosts` (CALLBACK_HOSTS, as the settings normalise it) allows; CallbackUrlError otherwise."""
    if not hosts:
        raise CallbackUrlError("callbacks are off on this server (CALLBACK_HOSTS is empty)")
    if len(url) > MAX_URL_CHARS:
        raise CallbackUrlError(f"callback_url is {len(url)} characters long; at most {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackUrlError(f"callback_url {url!r} is not a URL: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise CallbackUrlError(f"callback_url {url!r}: expected an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise CallbackUrlError(f"callback_url {url!r}: a user name, password or #fragment is not allowed")
    if any(character <= " " or character == "\x7f" for character in url):
        raise CallbackUrlError(
            f"callback_url {url!r}: spaces and control characters are not allowed (percent-encode them)"
        )
    host = parts.hostname.lower()
    if not is_host(host):
        raise CallbackUrlError(f"callback_url {url!r}: {host!r} is not a host name")
    effective_port = port if port is not None else _DEFAULT_PORTS[parts.scheme]
    if not any(_allows(entry, host, effective_port) for entry in hosts):
        raise CallbackUrlError(
            f"callbacks to {host}:{effective_port} are not allowed on this server; its operator lists the hosts "
            "callbacks may go to in CALLBACK_HOSTS"
        )
    return url


def _allows(entry: str, host: str, port: int) -> bool:
    """Whether a CALLBACK_HOSTS entry (`host`, `host:port`, `*.domain[:port]`, `[v6]:port`) allows host:port."""
    parts = urlsplit(f"//{entry.removeprefix('*.')}")
    allowed = parts.hostname or ""
    if parts.port is not None and parts.port != port:
        return False
    if entry.startswith("*."):
        return host.endswith(f".{allowed}")
    return host == allowed or _same_address(host, allowed)


def _same_address(first: str, second: str) -> bool:
    try:
        return ipaddress.ip_address(first) == ipaddress.ip_address(second)
    except ValueError:
        return False


def signature_headers(secrets: tuple[bytes, ...], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of a callback: its id, timestamp and one v1 signature per key."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in secrets
    )
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}


async def publish_callback(publisher: Publisher, url: str, event: JobFinishedV1) -> None:
    """Queue the POST of `event` to `url` (confirmed); BrokerUnavailableError when RabbitMQ did not take it."""
    await publisher.publish(
        message_type=JOB_CALLBACK,
        body=msgspec.json.encode(JobCallbackV1(url=url, event=event)),
        message_id=event.event_id,
        content_type="application/json",
        priority=Priority.ASYNC,
    )
