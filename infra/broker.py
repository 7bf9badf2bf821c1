"""RabbitMQ: the whole topology in one place, declared idempotently, and a confirming publisher.

Topology
    exchange  ams.jobs   (topic, durable, no arguments)   every job message, routing key = job type
    queue     ams.<capability>  (durable, priority 0..9, dead-letters to ams.dead), one per capability, bound
              with the routing keys of the job types it serves (CAPABILITY_QUEUES):
                  ams.index   image.index, image.delete, bucket.event, image.embed
                  ams.image   image.generate
                  ams.voice   voice.generate
                  ams.callback  job.callback (a job's end POSTed to its callback URL: contract/callbacks.py)
    exchange  ams.unrouted  (fanout, durable)  the alternate exchange of ams.jobs, set by the broker policy
              UNROUTED_POLICY (a policy, not an exchange argument: publishers such as MinIO declare ams.jobs
              themselves with no arguments, which an exchange declared with one would refuse)
    queue     ams.unrouted  (durable)  consumed by every processor, which dead-letters each message with the reason
              (unknown_type, naming the known types)
    exchange  ams.dead   (fanout, durable)    dead letters
    queue     ams.dead   (durable)            what an operator inspects and replays
    exchange  ams.retry  (headers, durable)   delayed retries of transient failures
    queue     ams.retry.<delay>  (durable, message TTL = delay, dead-letters back to ams.jobs with the
              message's own routing key, so a retry lands in its capability's queue), bound by header
              ams-retry-delay (no "x-": a headers exchange leaves binding arguments named x-... out of the match;
              the bindings by x-ams-retry-delay of earlier versions matched every copy, and are removed)
    exchange  ams.events  (topic, durable)  a job's end, routing key = "<job type>.<status>" (contract/events.py);
              no queue of ours is bound to it: whoever wants the events binds their own
Replies to waiting API requests go through the default exchange to each API process's own
exclusive reply queue, matched by correlation id; a streamed job's output goes the same way in pieces first
(type REPLY_PIECE, byte offset in OFFSET_HEADER), before its reply.

Policies cannot be set over AMQP: scripts/local-rabbitmq.sh, the compose definitions (infra/rabbitmq/) and the test
harness set it; on another broker, set it once (README, Queues and scale-out). Without it a message with an
unknown routing key is dropped by the broker.

Earlier versions had one queue, ams.jobs, bound with '#'. The first process to declare this topology unbinds that
queue, moves whatever waits in it to the capability queues (each copy confirmed before the original is acked) and
deletes it once empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse, urlunparse

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = structlog.get_logger(__name__)

JOBS_EXCHANGE = "ams.jobs"
LEGACY_JOBS_QUEUE = "ams.jobs"
DEAD_EXCHANGE = "ams.dead"
DEAD_QUEUE = "ams.dead"
UNROUTED_EXCHANGE = "ams.unrouted"
UNROUTED_QUEUE = "ams.unrouted"
RETRY_EXCHANGE = "ams.retry"
# where a job's end is announced (contract/events.py): a topic exchange with no queue of ours; whoever wants the
# events binds a queue of their own to it
EVENTS_EXCHANGE = "ams.events"
# the broker policy that makes ams.unrouted the alternate exchange of ams.jobs (rabbitmqctl set_policy arguments)
UNROUTED_POLICY = ("ams-unrouted", "^ams\\.jobs$", '{"alternate-exchange": "ams.unrouted"}')
# capability -> (queue, the routing keys = job types it receives); a test checks every job type of the contract
# is routed to exactly one capability
CAPABILITY_QUEUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "index": ("ams.index", ("image.index", "image.delete", "bucket.event", "image.embed")),
    "image": ("ams.image", ("image.generate",)),
    "voice": ("ams.voice", ("voice.generate",)),
    "callback": ("ams.callback", ("job.callback",)),
}
CAPABILITIES = tuple(CAPABILITY_QUEUES)
# The header a retry copy's delay queue is chosen by. A headers exchange leaves binding arguments whose names start
# with "x-" out of the match (they are the broker's), so this one must not start so: bound by x-ams-retry-delay
# (LEGACY_RETRY_DELAY_HEADER, before 2026-11-27) every retry queue matched every copy, and one retry became four.
RETRY_DELAY_HEADER = "ams-retry-delay"
LEGACY_RETRY_DELAY_HEADER = "x-ams-retry-delay"
# what the processor records on a message it retries or dead-letters (read back by the operator CLI)
ATTEMPTS_HEADER = "x-ams-attempts"
REASON_CODE_HEADER = "x-ams-reason-code"
REASON_HEADER = "x-ams-reason"
ROUTING_KEY_HEADER = "x-ams-routing-key"
FIRST_FAILURE_HEADER = "x-ams-first-failed-at"
LAST_FAILURE_HEADER = "x-ams-last-failed-at"
# what a redelivery deferred while its job's run lives on carries round the delay queue (processor/liveness.py)
DEFERRAL_HEADER = "x-ams-deferral"
# a piece of a streamed job's output on the reply queue: its AMQP type, and the header with its byte offset
REPLY_PIECE = "reply.piece"
OFFSET_HEADER = "x-ams-offset"
RETRY_DELAYS_SECONDS = (1, 5, 30, 120)
MAX_PRIORITY = 9
PUBLISH_TIMEOUT_SECONDS = 10.0
BLOCK_CHECK_SECONDS = 0.2  # how often a confirm still awaited checks whether RabbitMQ has blocked the connection

# What aio-pika raises while the broker is away or refuses: AMQP errors, socket errors, a confirm that does not
# come (TimeoutError), and RuntimeError for a channel or connection that is closed or not reopened yet
# ("Channel was not opened", "Connection was not opened": aiormq's ChannelInvalidStateError is one).
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)


class Priority:
    """Message priorities: a client waiting on a response is served before queued bulk work."""

    BULK = 0
    ASYNC = 4
    INTERACTIVE = 9


class BrokerUnavailableError(ConnectionError):
    """RabbitMQ could not be reached or refused the operation. `unsent`: the message of a failed publish certainly
    reached no queue (nothing was written, or RabbitMQ returned or refused it); otherwise it may still reach its
    queue (its confirm did not come: the connection was blocked or lost after the message was written)."""

    def __init__(self, message: str, *, unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and errors."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def capability_of(routing_key: str) -> str | None:
    """The capability whose queue receives messages with this routing key (None: no queue is bound to it)."""
    return next((name for name, (_, keys) in CAPABILITY_QUEUES.items() if routing_key in keys), None)


def queue_of(capability: str) -> str:
    return CAPABILITY_QUEUES[capability][0]


@dataclass(frozen=True, slots=True)
class Topology:
    jobs_exchange: AbstractExchange
    queues: dict[str, AbstractQueue]  # capability -> its queue
    unrouted_queue: AbstractQueue
    dead_exchange: AbstractExchange
    dead_queue: AbstractQueue
    retry_exchange: AbstractExchange


_CAPABILITY_QUEUE_ARGUMENTS = {"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": DEAD_EXCHANGE}
_UNROUTED_QUEUE_ARGUMENTS = {"x-dead-letter-exchange": DEAD_EXCHANGE}


async def declare_topology(connection: AbstractConnection) -> None:
    """Declare every exchange and queue, and move messages out of the single queue of earlier versions; safe to
    call any number of times from any process."""
    try:
        async with connection.channel() as channel:
            dead_exchange = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
            dead_queue = await channel.declare_queue(DEAD_QUEUE, durable=True)
            await dead_queue.bind(dead_exchange, routing_key="")
            unrouted_exchange = await channel.declare_exchange(
                UNROUTED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            unrouted_queue = await channel.declare_queue(
                UNROUTED_QUEUE, durable=True, arguments=_UNROUTED_QUEUE_ARGUMENTS
            )
            await unrouted_queue.bind(unrouted_exchange, routing_key="")
        async with connection.channel() as channel:
            await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            for name, routing_keys in CAPABILITY_QUEUES.values():
                queue = await channel.declare_queue(name, durable=True, arguments=_CAPABILITY_QUEUE_ARGUMENTS)
                for routing_key in routing_keys:
                    await queue.bind(JOBS_EXCHANGE, routing_key=routing_key)
            retry_exchange = await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True)
            for delay in RETRY_DELAYS_SECONDS:
                retry_queue = await channel.declare_queue(
                    retry_queue_name(delay), durable=True, arguments=retry_queue_arguments(delay)
                )
                await retry_queue.bind(
                    retry_exchange, routing_key="", arguments={"x-match": "all", RETRY_DELAY_HEADER: str(delay)}
                )
                legacy = {"x-match": "all", LEGACY_RETRY_DELAY_HEADER: str(delay)}
                for routing_key in ("", retry_queue.name):  # as the definitions file and earlier versions bound it
                    await retry_queue.unbind(retry_exchange, routing_key=routing_key, arguments=legacy)
        await _move_legacy_queue(connection)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailableError(f"could not declare the topology: {exc}") from exc


async def topology_on(channel: AbstractChannel) -> Topology:
    """The topology's exchanges and queues as objects of this channel, declared again on it (idempotent, after
    declare_topology): a robust channel re-declares what was declared on it after a reconnect, and restores its
    consumers only on queues it declared."""
    return Topology(
        jobs_exchange=await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True),
        queues={
            capability: await channel.declare_queue(name, durable=True, arguments=_CAPABILITY_QUEUE_ARGUMENTS)
            for capability, (name, _) in CAPABILITY_QUEUES.items()
        },
        unrouted_queue=await channel.declare_queue(UNROUTED_QUEUE, durable=True, arguments=_UNROUTED_QUEUE_ARGUMENTS),
        dead_exchange=await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True),
        dead_queue=await channel.declare_queue(DEAD_QUEUE, durable=True),
        retry_exchange=await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True),
    )


async def _move_legacy_queue(connection: AbstractConnection) -> None:
    """Unbind the single queue of earlier versions, move what waits in it to the capability queues (each copy
    confirmed before its original is acked), and delete it once it is empty and nobody consumes it."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        try:
            legacy = await channel.declare_queue(LEGACY_JOBS_QUEUE, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return
        await legacy.unbind(JOBS_EXCHANGE, routing_key="#")
        exchange = await channel.get_exchange(JOBS_EXCHANGE, ensure=False)
        moved = 0
        while (message := await legacy.get(no_ack=False, fail=False)) is not None:
            await exchange.publish(_copy(message, {}), routing_key=message.routing_key or message.type or "")
            await message.ack()
            moved += 1
        log.warning("legacy_queue_moved", queue=LEGACY_JOBS_QUEUE, messages=moved)
        try:
            await legacy.delete(if_unused=True, if_empty=True)
        except aio_pika.exceptions.ChannelPreconditionFailed:
            log.warning("legacy_queue_kept", queue=LEGACY_JOBS_QUEUE, reason="still consumed or not empty")
    finally:
        if not channel.is_closed:
            await channel.close()


def all_queue_names() -> list[str]:
    return [
        *(name for name, _ in CAPABILITY_QUEUES.values()),
        UNROUTED_QUEUE,
        DEAD_QUEUE,
        *(retry_queue_name(delay) for delay in RETRY_DELAYS_SECONDS),
    ]


async def consumers_of(connection: AbstractRobustConnection, capability: str) -> int:
    """How many processors consume the queue of this capability right now (a passive declare)."""
    try:
        async with connection.channel() as channel:
            queue = await channel.declare_queue(queue_of(capability), passive=True)
            return queue.declaration_result.consumer_count or 0
    except BROKER_ERRORS as exc:
        raise BrokerUnavailableError(f"could not read the consumers of {queue_of(capability)}: {exc}") from exc


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
    except BROKER_ERRORS as exc:
        raise BrokerUnavailableError(f"could not read queue depths: {exc}") from exc


_BLOCKED = "RabbitMQ is blocking publishers (a disk or memory alarm); nothing was sent"
_BLOCKED_AFTER_WRITE = (
    "RabbitMQ blocked the connection (a disk or memory alarm) before confirming it; it may still arrive when the "
    "alarm clears"
)


def blocked(connection: AbstractRobustConnection) -> bool:
    """Whether RabbitMQ is blocking this connection's publishes. It says so (connection.blocked) when a publish
    meets a disk or memory alarm, and again when the alarm clears (connection.unblocked). aiormq keeps the flag to
    itself, but its ready() waits for the connection to be open and unblocked: stepped once, it finishes at once
    when it would not wait, and is closed unfinished otherwise (nothing is left waiting). Only for an open
    connection: one that is reconnecting reads as blocked."""
    transport = connection.transport
    if transport is None:
        return False
    ready = transport.connection.ready()
    try:
        ready.send(None)
    except StopIteration:
        return False
    finally:
        ready.close()
    return True


class PublishBlockedError(TimeoutError):
    """The confirm wait ended early: RabbitMQ blocked the connection after the message was written (it is read
    and routed when the alarm clears)."""


class _BlockWatch:
    """Ends a confirm wait (through its asyncio.timeout) as soon as RabbitMQ says it has blocked the connection,
    instead of at the timeout: checked every BLOCK_CHECK_SECONDS while the wait lasts (a confirm normally comes
    within milliseconds, so the check rarely runs)."""

    def __init__(self, connection: AbstractRobustConnection, timeout: asyncio.Timeout) -> None:
        self._connection = connection
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(BLOCK_CHECK_SECONDS, self._check)
        self.fired = False

    def _check(self) -> None:
        if blocked(self._connection):
            self.fired = True
            self._timeout.reschedule(self._loop.time())
        else:
            self._handle = self._loop.call_later(BLOCK_CHECK_SECONDS, self._check)

    def stop(self) -> None:
        self._handle.cancel()


async def _confirmed(
    connection: AbstractRobustConnection,
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    mandatory: bool = True,
) -> None:
    """Publish (mandatory: returned when no queue takes it) and wait for the confirm: TimeoutError after
    PUBLISH_TIMEOUT_SECONDS, or PublishBlockedError as soon as RabbitMQ blocks the connection (the message may still
    arrive either way)."""
    watch: _BlockWatch | None = None
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS) as timeout:
            watch = _BlockWatch(connection, timeout)
            try:
                await exchange.publish(message, routing_key=routing_key, mandatory=mandatory)
            finally:
                watch.stop()
    except TimeoutError as exc:
        if watch is not None and watch.fired:
            raise PublishBlockedError(_BLOCKED_AFTER_WRITE) from exc
        raise


def _why(exc: BaseException) -> str:
    """What went wrong, also for the exceptions that say nothing (a confirm that did not come) or little."""
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return f"no queue takes it (RabbitMQ returned it: {exc})"
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        return (
            "RabbitMQ refused it (a queue at its length limit with overflow reject-publish refuses new messages; "
            f"{exc})"
        )
    if isinstance(exc, PublishBlockedError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"RabbitMQ did not confirm it within {PUBLISH_TIMEOUT_SECONDS:g} s (overloaded, or its disk is slow)"
    return str(exc) or type(exc).__name__


def retry_queue_name(delay_seconds: int) -> str:
    return f"ams.retry.{delay_seconds}s"


def retry_queue_arguments(delay_seconds: int) -> dict[str, Any]:
    """A delay queue's arguments: its copies wait `delay_seconds`, then go back to the jobs exchange."""
    return {"x-message-ttl": delay_seconds * 1000, "x-dead-letter-exchange": JOBS_EXCHANGE}


def retry_delay(attempt: int, at_least: float = 0.0) -> int:
    """The delay before retry number `attempt` (1-based): 1 s, 5 s, 30 s, then 120 s; or, when the failure asks
    for a longer wait (`at_least` seconds: a Retry-After), the shortest delay queue that waits that long (at most
    the longest one)."""
    delay = RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS)) - 1]
    if at_least <= delay:
        return delay
    return next((longer for longer in RETRY_DELAYS_SECONDS if longer >= at_least), RETRY_DELAYS_SECONDS[-1])


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


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply or a piece of a streamed output, as a requester receives it (`offset` None: the final reply)."""

    correlation_id: str
    body: bytes
    offset: int | None = None


ReplyReceiver = Callable[[Reply], None]


class Publisher:
    """Publishes persistent job messages with publisher confirms on one channel, job events (confirmed too) on a
    channel of their own, and replies to waiting requesters on a third channel without confirms: a reply is transient
    (the job record is the durable truth), so it goes out without a round trip to the broker, and the pieces and final
    reply of one job, all sent on that channel, reach the requester in order.

    RabbitMQ closes a channel on a channel-level error (an event published to a deleted ams.events exchange:
    NOT_FOUND), and aio-pika does not always reopen it. A channel so closed while the connection is up is replaced
    (the topology declared again first), as soon as it closes and before the next publish on it; events have their
    own channel so that a missing events exchange cannot fail a job's publish.

    A requester in the same process (the one-process mode, where the API and the processor share this
    publisher) registers its reply queue with `receive_locally`: its replies are then handed over in memory, in
    the order they are sent, instead of through the broker and back (about 0.6 ms per reply on a 2-core host).
    The request itself always goes through the broker: it must be stored there before anyone relies on it."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        topology: Topology,
        reply_channel: AbstractChannel,
        events_channel: AbstractChannel,
        events_exchange: AbstractExchange,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.topology = topology
        self.reply_channel = reply_channel
        self.events_channel = events_channel
        self.events_exchange = events_exchange
        self._local_receivers: dict[str, ReplyReceiver] = {}
        self._replacing = asyncio.Lock()
        self._replacements: set[asyncio.Task[None]] = set()
        for each in (channel, reply_channel, events_channel):
            self._watch(each)

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        await declare_topology(connection)
        channel = await connection.channel(publisher_confirms=True)
        reply_channel = await connection.channel(publisher_confirms=False)
        events_channel, events_exchange = await _events_channel(connection)
        return cls(connection, channel, await topology_on(channel), reply_channel, events_channel, events_exchange)

    @property
    def is_connected(self) -> bool:
        """Whether job messages and replies can be sent (the events channel, replaced on its own, is left out)."""
        return not self.connection.is_closed and not self.channel.is_closed and not self.reply_channel.is_closed

    def state(self) -> str:
        """The publishing connection's state: ok, disconnected, or blocked (RabbitMQ refuses to read its publishes
        until a disk or memory alarm clears)."""
        if not self.is_connected:
            return "disconnected"
        return "blocked" if blocked(self.connection) else "ok"

    def _sendable(self, what: str) -> None:
        """Fail at once, with nothing sent, when RabbitMQ cannot take a message now (instead of after the confirm
        timeout, with the message perhaps still to arrive)."""
        state = self.state()
        if state != "ok":
            why = "not connected to RabbitMQ" if state == "disconnected" else _BLOCKED
            raise BrokerUnavailableError(f"could not {what}: {why}", unsent=True)

    def _watch(self, channel: AbstractChannel) -> None:
        channel.close_callbacks.add(self._on_channel_close)

    def _on_channel_close(self, _channel: object, _exc: BaseException | None) -> None:
        """A channel closed: replace it at once if the connection is still up (a channel-level error), so that
        /readyz and the next publish find it open again; a lost connection is left to aio-pika's reconnect."""
        if self.connection.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self.replace_closed_channels(), name="replace-channels")
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def replace_closed_channels(self) -> None:
        """Open a new channel for each of ours RabbitMQ closed while the connection stays up, declaring the
        topology again first (what closed it may have been a deleted exchange). Failures are logged: the channel
        stays closed, writes answer 503, and the next publish tries again."""
        if not _connection_up(self.connection) or not self._closed_channels():
            return
        async with self._replacing:
            closed = self._closed_channels()
            if not closed or not _connection_up(self.connection):
                return
            try:
                await declare_topology(self.connection)
                if self.channel.is_closed:
                    channel = await self.connection.channel(publisher_confirms=True)
                    topology = await topology_on(channel)
                    self._retire(self.channel)
                    self.channel, self.topology = channel, topology
                    self._watch(channel)
                if self.events_channel.is_closed:
                    events_channel, self.events_exchange = await _events_channel(self.connection)
                    self._retire(self.events_channel)
                    self.events_channel = events_channel
                    self._watch(events_channel)
                if self.reply_channel.is_closed:
                    reply_channel = await self.connection.channel(publisher_confirms=False)
                    self._retire(self.reply_channel)
                    self.reply_channel = reply_channel
                    self._watch(reply_channel)
            except BROKER_ERRORS as exc:
                log.warning("broker_channel_reopen_failed", channels=closed, error=str(exc))
                return
            log.warning("broker_channel_reopened", channels=closed)

    def _closed_channels(self) -> list[str]:
        named = {"jobs": self.channel, "events": self.events_channel, "replies": self.reply_channel}
        return [name for name, channel in named.items() if channel.is_closed]

    def _retire(self, channel: AbstractChannel) -> None:
        """Stop watching a replaced channel and close it for good, so that aio-pika does not reopen it beside its
        replacement."""
        channel.close_callbacks.discard(self._on_channel_close)
        task = asyncio.get_running_loop().create_task(_close_quietly(channel), name="retire-channel")
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

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
        await self.replace_closed_channels()
        self._sendable(f"publish {message_type} message {message_id}")
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
            await _confirmed(self.connection, self.topology.jobs_exchange, message, message_type)
        except BROKER_ERRORS as exc:
            # returned (no queue bound) or nacked: RabbitMQ said it did not queue it
            unsent = isinstance(exc, aio_pika.exceptions.DeliveryError)
            raise BrokerUnavailableError(
                f"could not publish {message_type} message {message_id}: {_why(exc)}", unsent=unsent
            ) from exc

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
        await self.replace_closed_channels()
        self._sendable(f"republish message {message.message_id}")
        copy = _copy(message, headers, message_id=message_id, message_type=message_type)
        exchange = self.topology.dead_exchange if to_dead_letters else self.topology.retry_exchange
        routing_key = message.routing_key or message.type or ""
        try:
            await _confirmed(self.connection, exchange, copy, routing_key)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailableError(f"could not republish message {message.message_id}: {_why(exc)}") from exc

    async def announce(self, *, routing_key: str, body: bytes, message_id: str, message_type: str) -> None:
        """Publish an event (persistent JSON, confirmed) to the events exchange, on the events channel. Not mandatory:
        an event nobody has bound a queue for is dropped by RabbitMQ, which is not an error. When the exchange is
        gone (deleted under us: NOT_FOUND, which closes the events channel), the topology is declared again on a new
        channel and the event published once more."""
        what = f"publish {message_type} event {message_id}"
        for last in (False, True):
            await self.replace_closed_channels()
            self._sendable(what)
            if self.events_channel.is_closed:
                raise BrokerUnavailableError(f"could not {what}: the events channel is closed", unsent=True)
            message = aio_pika.Message(
                body=body,
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                message_id=message_id,
                type=message_type,
                timestamp=datetime.now(tz=UTC),
            )
            try:
                await _confirmed(self.connection, self.events_exchange, message, routing_key, mandatory=False)
                return
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                if last:
                    raise BrokerUnavailableError(f"could not {what}: {_why(exc)}", unsent=True) from exc
                log.warning("events_exchange_missing", exchange=EVENTS_EXCHANGE, error=str(exc))
            except BROKER_ERRORS as exc:
                raise BrokerUnavailableError(f"could not {what}: {_why(exc)}") from exc

    def receive_locally(self, reply_to: str, receiver: ReplyReceiver) -> None:
        """Hand the replies addressed to the queue `reply_to` to `receiver` in this process, not to the broker."""
        self._local_receivers[reply_to] = receiver

    def stop_receiving_locally(self, reply_to: str) -> None:
        self._local_receivers.pop(reply_to, None)

    async def reply(self, reply_to: str, correlation_id: str, body: bytes, content_type: str) -> None:
        """Send a transient reply to a waiting requester (the job record stays the durable truth)."""
        receiver = self._local_receivers.get(reply_to)
        if receiver is not None:
            receiver(Reply(correlation_id, body))
            return
        if self._dropped_while_blocked("reply_dropped", correlation_id):
            return
        await self.replace_closed_channels()
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self.reply_channel.default_exchange.publish(message, routing_key=reply_to)
        except BROKER_ERRORS as exc:
            log.warning("reply_failed", reply_to=reply_to, correlation_id=correlation_id, error=str(exc))

    def _dropped_while_blocked(self, event: str, correlation_id: str) -> bool:
        """A reply is not written to a connection RabbitMQ is blocking: it would wait in the socket until the alarm
        clears and, once the socket is full, hold up the settling of every job behind it. The requester answers
        from the job record instead (202 with the job once it stops waiting)."""
        if self.state() != "blocked":
            return False
        log.warning(event, correlation_id=correlation_id, reason=_BLOCKED)
        return True

    async def reply_piece(self, reply_to: str, correlation_id: str, offset: int, data: bytes) -> None:
        """Send a piece of a streamed job's output to a waiting requester: transient, with its byte offset. On the
        reply channel, like the reply that ends the pieces, so the requester gets them in order."""
        receiver = self._local_receivers.get(reply_to)
        if receiver is not None:
            receiver(Reply(correlation_id, data, offset))
            return
        if self._dropped_while_blocked("reply_piece_dropped", correlation_id):
            return
        await self.replace_closed_channels()
        message = aio_pika.Message(
            body=data,
            type=REPLY_PIECE,
            correlation_id=correlation_id,
            headers={OFFSET_HEADER: offset},
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self.reply_channel.default_exchange.publish(message, routing_key=reply_to)
        except BROKER_ERRORS as exc:
            log.warning(
                "reply_piece_failed", reply_to=reply_to, correlation_id=correlation_id, offset=offset, error=str(exc)
            )


def _connection_up(connection: AbstractRobustConnection) -> bool:
    """Whether the connection itself is open now (not closed, not lost and waiting for aio-pika's reconnect)."""
    transport = connection.transport
    reconnecting = getattr(connection, "reconnecting", False)
    if connection.is_closed or reconnecting or transport is None:
        return False
    return not transport.connection.is_closed


async def _events_channel(connection: AbstractRobustConnection) -> tuple[AbstractChannel, AbstractExchange]:
    """A confirm channel for job events, with the events exchange declared on it (idempotent)."""
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    return channel, exchange


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except BROKER_ERRORS as exc:
        log.debug("retired_channel_close_failed", error=str(exc))


def _copy(
    message: AbstractIncomingMessage,
    headers: Mapping[str, Any],
    *,
    message_id: str | None = None,
    message_type: str | None = None,
) -> aio_pika.Message:
    """A persistent copy of a received message with every property kept and `headers` added."""
    return aio_pika.Message(
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
