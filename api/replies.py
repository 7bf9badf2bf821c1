"""Waiting for job outcomes: one exclusive reply queue per API process, futures matched by correlation id."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from contract.messages import JobReply

log = structlog.get_logger(__name__)


class ReplyListener:
    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._pending: dict[str, asyncio.Future[JobReply]] = {}
        self._channel: AbstractChannel | None = None
        self.queue_name = f"ams.reply.{uuid.uuid4().hex}"

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)

    @property
    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def expect(self, correlation_id: str) -> asyncio.Future[JobReply]:
        future: asyncio.Future[JobReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        return future

    def forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)

    async def wait(self, correlation_id: str, future: asyncio.Future[JobReply], seconds: float) -> JobReply | None:
        """The reply, or None if it did not come within `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                return await future
        except TimeoutError:
            return None
        finally:
            self.forget(correlation_id)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is None or future.done():
            return
        try:
            reply = msgspec.msgpack.decode(message.body, type=JobReply)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("reply_undecodable", correlation_id=message.correlation_id, error=str(exc))
            return
        future.set_result(reply)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
