"""A stand-in for an incoming message, for tests that settle a job's outcome through the real Settler."""

from __future__ import annotations


class Delivery:
    """As much of an incoming message as a settled success without a requester uses."""

    def __init__(self, message_id: str) -> None:
        self.message_id, self.headers, self.reply_to, self.correlation_id = message_id, {}, None, None
        self.acked = False

    async def ack(self) -> None:
        self.acked = True
