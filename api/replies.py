"""Waiting for job outcomes: one exclusive reply queue per API process, futures matched by correlation id; for a
streamed job, a queue that gets the output's pieces as they come and then the reply. A processor in the same
process hands its replies over in memory (Publisher.receive_locally); others send them through the broker."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from contract.messages import JobReply
from infra.broker import OFFSET_HEADER, REPLY_PIECE, Publisher, Reply

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReplyPiece:
    """A piece of a streamed job's output: where it starts in the output (bytes), and its bytes."""

    offset: int
    data: bytes


StreamEvent = ReplyPiece | JobReply


class ReplyListener:
    def __init__(self, connection: AbstractRobustConnection, publisher: Publisher | None = None) -> None:
        self._connection = connection
        self._publisher = publisher
        self._pending: dict[str, asyncio.Future[JobReply]] = {}
        self._streams: dict[str, asyncio.Queue[StreamEvent]] = {}
        self._channel: AbstractChannel | None = None
        self.queue_name = f"ams.reply.{uuid.uuid4().hex}"

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)
        if self._publisher is not None:
            self._publisher.receive_locally(self.queue_name, self.receive)

    @property
    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def expect(self, correlation_id: str) -> asyncio.Future[JobReply]:
        future: asyncio.Future[JobReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        return future

    def expect_stream(self, correlation_id: str) -> asyncio.Queue[StreamEvent]:
        """A queue that gets the job's pieces in order (ReplyPiece), then its reply, which ends the stream."""
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._streams[correlation_id] = events
        return events

    def forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)
        self._streams.pop(correlation_id, None)

    async def wait(
        self,
        correlation_id: str,
        future: asyncio.Future[JobReply],
        seconds: float,
        gone: asyncio.Future[None] | None = None,
    ) -> JobReply | None:
        """The reply, or None if it did not come within `seconds` or `gone` (the waiting client left) came first.
        Either way the correlation id is forgotten: a reply that comes later is dropped."""
        try:
            async with asyncio.timeout(seconds):
                if gone is None:
                    return await future
                await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
                return future.result() if future.done() else None
        except TimeoutError:
            return None
        finally:
            self.forget(correlation_id)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        offset: int | None = None
        if message.type == REPLY_PIECE:
            found = (message.headers or {}).get(OFFSET_HEADER)
            # a piece without a usable offset cannot be placed: the reader sees a gap and ends the stream
            offset = found if isinstance(found, int) else -1
        self.receive(Reply(message.correlation_id or "", message.body, offset))

    def receive(self, reply: Reply) -> None:
        """Take a reply (or a piece of a streamed output) to whoever waits for it; one nobody waits for is dropped."""
        if reply.offset is not None:
            stream = self._streams.get(reply.correlation_id)
            if stream is not None:
                stream.put_nowait(ReplyPiece(reply.offset, reply.body))
            return
        if not self._waits_for(reply.correlation_id):
            return
        try:
            decoded = msgspec.msgpack.decode(reply.body, type=JobReply)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("reply_undecodable", correlation_id=reply.correlation_id, error=str(exc))
            return
        self.deliver(reply.correlation_id, decoded)

    def _waits_for(self, correlation_id: str) -> bool:
        future = self._pending.get(correlation_id)
        return correlation_id in self._streams or (future is not None and not future.done())

    def deliver(self, correlation_id: str, reply: JobReply) -> None:
        """Answer whoever in this process waits for the job (a stream ends with it); nobody waiting: dropped."""
        stream = self._streams.pop(correlation_id, None)
        future = self._pending.pop(correlation_id, None)
        if stream is not None:
            stream.put_nowait(reply)
        elif future is not None and not future.done():
            future.set_result(reply)

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.stop_receiving_locally(self.queue_name)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._streams.clear()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
