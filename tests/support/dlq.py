"""Dead letters put straight into ams.dead, and queue state read back, with a plain aio-pika client."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import msgspec

from infra.broker import DEAD_EXCHANGE, declare_topology, topology_on


@dataclass
class Letter:
    """A dead letter as the processor writes it: the job's properties plus the x-ams-* failure headers."""

    message_id: str | None
    type: str | None
    reason_code: str
    attempts: int
    failed_ago: dt.timedelta  # last failure, this long before now
    body: Any  # dict: encoded as content_type says; bytes: sent as is
    content_type: str = "application/json"
    routing_key: str | None = None  # defaults to the type
    priority: int = 0
    reply_to: str | None = None
    correlation_id: str | None = None
    extra_headers: dict[str, Any] = field(default_factory=dict)

    def encoded_body(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if self.content_type == "application/msgpack":
            return msgspec.msgpack.encode(self.body)
        return json.dumps(self.body).encode()

    def message(self, now: dt.datetime) -> aio_pika.Message:
        last = now - self.failed_ago
        first = last - dt.timedelta(minutes=self.attempts)
        headers: dict[str, Any] = {
            "x-ams-attempts": self.attempts,
            "x-ams-reason-code": self.reason_code,
            "x-ams-reason": f"{self.reason_code} happened",
            "x-ams-routing-key": self.routing_key or self.type or "",
            "x-ams-first-failed-at": iso(first),
            "x-ams-last-failed-at": iso(last),
            "ams-retry-delay": "120",
            "x-ams-retry-delay": "120",  # what letters of earlier versions carry
            **self.extra_headers,
        }
        return aio_pika.Message(
            self.encoded_body(),
            content_type=self.content_type,
            message_id=self.message_id,
            type=self.type,
            priority=self.priority,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def reset_and_seed(amqp_url: str, letters: list[Letter], now: dt.datetime) -> None:
    """Empty the capability queues and ams.dead, then dead-letter `letters` in this order."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare_topology(connection)
        channel = await connection.channel(publisher_confirms=True)
        topology = await topology_on(channel)
        for queue in topology.queues.values():
            await queue.purge()
        await topology.dead_queue.purge()
        exchange = await channel.get_exchange(DEAD_EXCHANGE)
        for letter in letters:
            await exchange.publish(letter.message(now), routing_key=letter.routing_key or letter.type or "")


async def peek(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in `queue`, in order, left in the queue (taken without ack, returned on channel close)."""
    taken = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        while (message := await source.get(no_ack=False, fail=False)) is not None:
            taken.append(message)
    return taken


async def depth(amqp_url: str, queue: str) -> int:
    """Messages ready in `queue`, from a passive declare (does not touch them)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
