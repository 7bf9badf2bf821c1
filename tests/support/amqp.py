"""A plain aio-pika client, independent of the product's publisher, as an upstream system would use."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika


def _message(
    message_type: str,
    body: bytes | dict[str, Any],
    message_id: str,
    content_type: str,
    priority: int,
    headers: dict[str, Any] | None,
    reply_to: str | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        json.dumps(body).encode() if isinstance(body, dict) else body,
        content_type=content_type,
        message_id=message_id,
        type=message_type,
        priority=priority,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers or {},
        reply_to=reply_to,
        correlation_id=message_id if reply_to else None,
    )


async def publish(
    amqp_url: str,
    message_type: str,
    body: bytes | dict[str, Any],
    *,
    message_id: str | None = None,
    content_type: str = "application/json",
    priority: int = 0,
    headers: dict[str, Any] | None = None,
    reply_to: str | None = None,
) -> str:
    """Publish one message (confirmed); with `reply_to`, its correlation id is its message id."""
    message_id = message_id or str(uuid.uuid4())
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("ams.jobs")
        message = _message(message_type, body, message_id, content_type, priority, headers, reply_to)
        await exchange.publish(message, routing_key=message_type)
    return message_id


async def publish_many(amqp_url: str, message_type: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Publish a backlog at once: one connection, the confirms awaited together."""
    ids = [str(uuid.uuid4()) for _ in bodies]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("ams.jobs")
        await asyncio.gather(
            *(
                exchange.publish(_message(message_type, body, message_id, "application/json", 0, None), message_type)
                for body, message_id in zip(bodies, ids, strict=True)
            )
        )
    return ids


async def drain(amqp_url: str, queue: str, timeout: float = 5.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message currently in `queue` (acking them)."""
    taken = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                if taken:
                    break
                await asyncio.sleep(0.05)
                continue
            taken.append(message)
    return taken


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def next_reply(queue: aio_pika.abc.AbstractQueue, timeout: float) -> aio_pika.abc.AbstractIncomingMessage | None:
    """The first message to reach a reply queue within `timeout` seconds (taken), or None."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await queue.get(no_ack=True, fail=False)
        if reply is not None or asyncio.get_running_loop().time() >= deadline:
            return reply
        await asyncio.sleep(0.05)
