"""`ams-ops events watch`: job ends as they are announced on ams.events (contract/events.py), for an operator's
terminal or a script. The watch has a queue of its own (exclusive, gone when it stops), bound with the routing keys
the filters make, so it sees the events announced while it runs, none from before."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import aio_pika
import msgspec

from contract.events import JobFinishedV1
from infra.broker import EVENTS_EXCHANGE, BrokerUnavailableError, connect, declare_topology, redact
from infra.settings import Settings
from processor.ops.errors import OperationFailedError

STATUSES = ("succeeded", "failed")


def binding_keys(types: Sequence[str], statuses: Sequence[str]) -> list[str]:
    """The routing keys (`<job type>.<status>`, every job type has one dot) that select these types and statuses;
    none given: all of them."""
    return [f"{kind}.{status}" for kind in (types or ["*.*"]) for status in (statuses or ["*"])]


def event_line(event: JobFinishedV1) -> str:
    """One event as a line: when it finished, the job, its type and status, and the error's code."""
    code = event.error.code if event.error is not None else "-"
    return f"{event.finished_at}  {event.job_id}  {event.type:<15} {event.status:<9} {code}"


async def watch_events(
    settings: Settings,
    keys: Sequence[str],
    show: Callable[[JobFinishedV1], None],
    *,
    count: int | None = None,
    seconds: float | None = None,
    ready: Callable[[], None] = lambda: None,
) -> int:
    """Show each event that matches `keys` until `count` were shown or `seconds` passed (or the task is cancelled);
    how many were shown. `ready` is called once the watch's queue is bound."""
    try:
        connection = await connect(settings.amqp_url, settings.amqp_connect_timeout_seconds)
    except BrokerUnavailableError as exc:
        raise OperationFailedError(str(exc)) from None
    shown = 0
    try:
        await declare_topology(connection)
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for key in keys:
            await queue.bind(EVENTS_EXCHANGE, routing_key=key)
        ready()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds), queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    try:
                        event = msgspec.json.decode(message.body, type=JobFinishedV1)
                    except msgspec.DecodeError:  # not one of ours: someone else published to the exchange
                        continue
                    show(event)
                    shown += 1
                    if count is not None and shown >= count:
                        break
    except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise OperationFailedError(
            f"RabbitMQ at {redact(settings.amqp_url)} (AMQP_URL) failed while watching {EVENTS_EXCHANGE}: {exc}"
        ) from None
    finally:
        await connection.close()
    return shown
