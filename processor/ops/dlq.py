"""Reading, replaying and deleting the dead letters in ams.dead, over one aio-pika channel.

`open_dead_letters` takes every message of ams.dead with basic.get and no ack, so a command works on one
consistent snapshot and never loses a message:
    replay   publishes a copy to ams.jobs (its routing key takes it to its capability's queue), waits for the
             broker's confirm, then acks the dead letter
             (a crash in between leaves both: a duplicate at worst, and jobs are idempotent by message id)
    delete   acks the dead letter
    the rest goes back to ams.dead, in its original order, when the channel closes
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, DeliveryMode

from infra.broker import (
    DEAD_QUEUE,
    JOBS_EXCHANGE,
    BrokerUnavailableError,
    connect,
    declare_topology,
    redact,
    topology_on,
)
from processor.ops.errors import OperationFailedError
from processor.ops.headers import NOT_REPLAYED_HEADERS, REPLAYED_AT_HEADER
from processor.ops.letters import DeadLetter

_TIMEOUT_SECONDS = 30


class DeadLetterQueue:
    """Every message that was in ams.dead, held unacknowledged until the queue is closed."""

    def __init__(self, jobs_exchange: AbstractExchange, held: list[AbstractIncomingMessage]) -> None:
        self._jobs_exchange = jobs_exchange
        self._held = dict(enumerate(held))
        self.letters = [DeadLetter.from_message(position, message) for position, message in enumerate(held)]

    @property
    def remaining(self) -> int:
        """How many letters go back to ams.dead when the queue is closed."""
        return len(self._held)

    def with_id(self, message_id: str) -> list[DeadLetter]:
        return [letter for letter in self.letters if letter.message_id == message_id]

    async def replay(self, letter: DeadLetter) -> None:
        """Publish the job again to ams.jobs with its full number of attempts, then drop the dead letter."""
        message = self._held[letter.position]
        headers = {name: value for name, value in (message.headers or {}).items() if name not in NOT_REPLAYED_HEADERS}
        headers[REPLAYED_AT_HEADER] = (
            dt.datetime.now(tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        copy = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            priority=message.priority,
            timestamp=message.timestamp,
            app_id=message.app_id,
            headers=headers,
        )
        try:
            await self._jobs_exchange.publish(
                copy, routing_key=letter.routing_key, mandatory=True, timeout=_TIMEOUT_SECONDS
            )
        except aio_pika.exceptions.PublishError:
            raise OperationFailedError(
                f"{JOBS_EXCHANGE} routed dead letter {letter.label} (routing key {letter.routing_key!r}) to no queue"
            ) from None
        except aio_pika.exceptions.DeliveryError as exc:
            raise OperationFailedError(f"RabbitMQ refused the copy of dead letter {letter.label}: {exc}") from None
        await message.ack()
        del self._held[letter.position]

    async def delete(self, letter: DeadLetter) -> None:
        await self._held[letter.position].ack()
        del self._held[letter.position]


@asynccontextmanager
async def open_dead_letters(amqp_url: str, connect_timeout_seconds: float) -> AsyncIterator[DeadLetterQueue]:
    """Hold every message of ams.dead; on exit, whatever was neither replayed nor deleted goes back."""
    try:
        connection = await connect(amqp_url, connect_timeout_seconds)
    except BrokerUnavailableError as exc:
        raise OperationFailedError(str(exc)) from None
    try:
        await declare_topology(connection)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await topology_on(channel)
        held: list[AbstractIncomingMessage] = []
        while (
            message := await topology.dead_queue.get(no_ack=False, fail=False, timeout=_TIMEOUT_SECONDS)
        ) is not None:
            held.append(message)
        yield DeadLetterQueue(topology.jobs_exchange, held)
        await channel.close()
    except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
        raise OperationFailedError(
            f"RabbitMQ at {redact(amqp_url)} (AMQP_URL) failed while working on {DEAD_QUEUE}: "
            f"{str(exc) or type(exc).__name__}; unsettled dead letters stay in {DEAD_QUEUE}"
        ) from None
    finally:
        await connection.close()
