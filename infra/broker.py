"""RabbitMQ: the whole topology in one place, declared idempotently, and a confirming publisher.

Topology
    exchange  ams.jobs   (topic, durable)     every job message, routing key = message type
    queue     ams.jobs   (durable, priority 0..9, dead-letters to ams.dead)   bound with '#'
    exchange  ams.dead   (fanout, durable)    dead letters
    queue     ams.dead   (durable)            what an operator inspects and replays
    exchange  ams.retry  (headers, durable)   delayed retries of transient failures
    queue     ams.retry.<delay>  (durable, message TTL = delay, dead-letters back to ams.jobs with the
              message's own routing key), bound by header x-ams-retry-delay
Replies to waiting API requests go through the default exchange to each API process's own
exclusive reply queue, matched by correlation id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse, urlunparse

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = structlog.get_logger(__name__)

JOBS_EXCHANGE = "ams.jobs"
JOBS_QUEUE = "ams.jobs"
DEAD_EXCHANGE = "ams.dead"
DEAD_QUEUE = "ams.dead"
RETRY_EXCHANGE = "ams.retry"
RETRY_DELAY_HEADER = "x-ams-retry-delay"
# what the processor records on a message it retries or dead-letters (read back by the operator CLI)
ATTEMPTS_HEADER = "x-ams-attempts"
REASON_CODE_HEADER = "x-ams-reason-code"
REASON_HEADER = "x-ams-reason"
ROUTING_KEY_HEADER = "x-ams-routing-key"
FIRST_FAILURE_HEADER = "x-ams-first-failed-at"
LAST_FAILURE_HEADER = "x-ams-last-failed-at"
RETRY_DELAYS_SECONDS = (1, 5, 30, 120)
MAX_PRIORITY = 9


class Priority:
    """Message priorities: a client waiting on a response is served before queued bulk work."""

    BULK = 0
    ASYNC = 4
    INTERACTIVE = 9


class BrokerUnavailableError(ConnectionError):
    """RabbitMQ could not be reached or refused the operation."""


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and errors."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class Topology:
    jobs_exchange: AbstractExchange
    jobs_queue: AbstractQueue
    dead_exchange: AbstractExchange
    dead_queue: AbstractQueue
    retry_exchange: AbstractExchange


async def declare_topology(channel: AbstractChannel) -> Topology:
    """Declare every exchange and queue; safe to call any number of times from any process."""
    jobs_exchange = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_exchange = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    jobs_queue = await channel.declare_queue(
        JOBS_QUEUE,
        durable=True,
        arguments={"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": DEAD_EXCHANGE},
    )
    await jobs_queue.bind(jobs_exchange, routing_key="#")
    dead_queue = await channel.declare_queue(DEAD_QUEUE, durable=True)
    await dead_queue.bind(dead_exchange, routing_key="")
    retry_exchange = await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True)
    for delay in RETRY_DELAYS_SECONDS:
        retry_queue = await channel.declare_queue(
            retry_queue_name(delay),
            durable=True,
            arguments={
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": JOBS_EXCHANGE,
            },
        )
        await retry_queue.bind(retry_exchange, arguments={"x-match": "all", RETRY_DELAY_HEADER: str(delay)})
    return Topology(jobs_exchange, jobs_queue, dead_exchange, dead_queue, retry_exchange)


def all_queue_names() -> list[str]:
    return [JOBS_QUEUE, DEAD_QUEUE, *(retry_queue_name(delay) for delay in RETRY_DELAYS_SECONDS)]


async def queue_depths(connection: AbstractRobustConnection) -> dict[str, tuple[int, int]]:
    """For each queue of the topology: (messages ready, consumers), read with passive declares."""
    try:
        async with connection.channel() as channel:
            depths = {}
            for name in all_queue_names():
                queue = await channel.declare_queue(name, passive=True)
                result = queue.declaration_result
                depths[name] = (result.message_count or 0, result.consumer_count or 0)
            return depths
    except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise BrokerUnavailableError(f"could not read queue depths: {exc}") from exc


def retry_queue_name(delay_seconds: int) -> str:
    return f"ams.retry.{delay_seconds}s"


def retry_delay(attempt: int) -> int:
    """The delay before retry number `attempt` (1-based): 1 s, 5 s, 30 s, then 120 s."""
    return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS)) - 1]


async def connect(url: str, timeout_seconds: float = 30.0) -> AbstractRobustConnection:
    """A robust connection, retrying the first connect for up to timeout_seconds."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            stop=stop_after_delay(timeout_seconds),
            reraise=True,
        ):
            with attempt:
                return await aio_pika.connect_robust(url, timeout=10)
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnavailableError(
            f"cannot reach RabbitMQ at {redact(url)} (AMQP_URL) after {timeout_seconds:.0f}s: {exc}"
        ) from exc
    raise AssertionError("unreachable")


class Publisher:
    """Publishes persistent job messages with publisher confirms on one channel."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel, topology: Topology) -> None:
        self.connection = connection
        self.channel = channel
        self.topology = topology

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel)
        return cls(connection, channel, topology)

    @property
    def is_connected(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed

    async def publish(
        self,
        *,
        message_type: str,
        body: bytes,
        message_id: str,
        content_type: str,
        priority: int = Priority.BULK,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message_id,
            type=message_type,
            priority=priority,
            reply_to=reply_to,
            correlation_id=correlation_id,
            headers=dict(headers or {}),
        )
        try:
            await self.topology.jobs_exchange.publish(message, routing_key=message_type, mandatory=True)
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            raise BrokerUnavailableError(f"could not publish {message_type} message {message_id}: {exc}") from exc

    async def republish(
        self,
        message: AbstractIncomingMessage,
        *,
        to_dead_letters: bool,
        headers: Mapping[str, Any],
        message_id: str | None = None,
        message_type: str | None = None,
    ) -> None:
        """Publish a copy of a received message, with extra headers, to the dead-letter or the retry exchange.

        The copy keeps the body and every property (message id, type, priority, reply_to, correlation id) and
        the original routing key, so a retried or replayed message is the same job. `message_id` and
        `message_type` fill in what a notification arrived without (the id and type it was processed under).
        """
        copy = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id or message_id,
            type=message.type or message_type,
            priority=message.priority,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            app_id=message.app_id,
            headers={**(message.headers or {}), **headers},
        )
        exchange = self.topology.dead_exchange if to_dead_letters else self.topology.retry_exchange
        routing_key = message.routing_key or message.type or ""
        try:
            await exchange.publish(copy, routing_key=routing_key, mandatory=True)
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            raise BrokerUnavailableError(f"could not republish message {message.message_id}: {exc}") from exc

    async def reply(self, reply_to: str, correlation_id: str, body: bytes, content_type: str) -> None:
        """Send a transient reply to a waiting requester (the job record stays the durable truth)."""
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self.channel.default_exchange.publish(message, routing_key=reply_to)
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            log.warning("reply_failed", reply_to=reply_to, correlation_id=correlation_id, error=str(exc))
