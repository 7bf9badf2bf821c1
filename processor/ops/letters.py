"""A dead letter as the operator sees it: the message's properties and the failure the processor recorded."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from processor.ops.headers import (
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
)

_PROPERTIES = (
    "message_id",
    "type",
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "timestamp",
    "user_id",
    "app_id",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    position: int  # 0-based place in ams.dead when it was read
    message_id: str | None
    type: str | None
    routing_key: str  # where a replay publishes it on ams.jobs
    reason_code: str | None
    reason: str | None
    attempts: int | None
    first_failed_at: str | None
    last_failed_at: str | None
    content_type: str | None
    properties: dict[str, Any]  # AMQP properties, exchange and routing key, as plain values
    headers: dict[str, Any]  # as plain values (bytes decoded or summarised, times as ISO-8601)
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def last_failure(self) -> dt.datetime | None:
        return parse_timestamp(self.last_failed_at)

    @property
    def label(self) -> str:
        """How messages name this letter: its message id, or its position when it has none."""
        return repr(self.message_id) if self.message_id else f"#{self.position + 1} (no message id)"

    def summary(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.type,
            "routing_key": self.routing_key,
            "reason_code": self.reason_code,
            "reason": self.reason,
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at,
            "last_failed_at": self.last_failed_at,
            "content_type": self.content_type,
            "size": self.size,
        }

    @classmethod
    def from_message(cls, position: int, message: AbstractIncomingMessage) -> DeadLetter:
        headers = {str(name): plain(value) for name, value in (message.headers or {}).items()}
        properties = {name: plain(getattr(message, name)) for name in _PROPERTIES if getattr(message, name) is not None}
        properties.update(exchange=message.exchange, routing_key=message.routing_key)
        return cls(
            position=position,
            message_id=message.message_id or None,
            type=message.type or None,
            routing_key=replay_routing_key(message),
            reason_code=_text(headers, REASON_CODE_HEADER),
            reason=_text(headers, REASON_HEADER),
            attempts=_whole(headers.get(ATTEMPTS_HEADER)),
            first_failed_at=_text(headers, FIRST_FAILURE_HEADER),
            last_failed_at=_text(headers, LAST_FAILURE_HEADER),
            content_type=message.content_type or None,
            properties=properties,
            headers=headers,
            body=message.body,
        )


def replay_routing_key(message: AbstractIncomingMessage) -> str:
    """The routing key the job had: the processor's header, else the job type, else the dead letter's own key."""
    recorded = plain((message.headers or {}).get(ROUTING_KEY_HEADER))
    return str(recorded or message.type or message.routing_key or "")


def parse_timestamp(text: str | None) -> dt.datetime | None:
    """An ISO-8601 time (a trailing Z is UTC, no zone is taken as UTC); None when absent or unreadable."""
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def plain(value: object) -> Any:
    """A header or property value as something JSON can hold: text decoded, other bytes summarised."""
    if value is None or isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return int(value)  # enums such as DeliveryMode become their number
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return f"<{len(data)} bytes>"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(name): plain(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return str(value)


def _text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None or value == "" else str(value)


def _whole(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
