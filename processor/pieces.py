"""Streamed output: the pieces of a job's output sent to the requester's reply queue as they are made."""

from __future__ import annotations

from aio_pika.abc import AbstractIncomingMessage

from contract.messages import STREAM_HEADER
from infra.broker import Publisher


class ReplyPieces:
    """Sends pieces to one requester, each with its byte offset in the output. A piece the broker refuses is
    logged and lost, and the offset moves on anyway, so the requester sees the gap."""

    def __init__(self, publisher: Publisher, reply_to: str, correlation_id: str) -> None:
        self._publisher = publisher
        self._reply_to = reply_to
        self._correlation_id = correlation_id
        self.offset = 0

    async def send(self, data: bytes) -> None:
        if not data:
            return
        offset, self.offset = self.offset, self.offset + len(data)
        await self._publisher.reply_piece(self._reply_to, self._correlation_id, offset, data)


def pieces_for(message: AbstractIncomingMessage, publisher: Publisher) -> ReplyPieces | None:
    """A sink for the message's output when its requester asked for it streamed (STREAM_HEADER, reply_to and
    correlation_id); None otherwise."""
    if not (message.headers or {}).get(STREAM_HEADER) or not message.reply_to or not message.correlation_id:
        return None
    return ReplyPieces(publisher, message.reply_to, message.correlation_id)
