"""Streamed job output: a job's pieces, as they arrive on the reply queue, as the body of a chunked response.

The response starts with the first piece; the job's reply ends it. Once bytes have left, an error can no longer
become an error response: a piece that does not follow the bytes sent (a redelivered job that started over), a
failed reply, or SYNC_TIMEOUT_SECONDS without a piece end the body abnormally (the connection closes before the
last chunk), so the client sees a truncated body, never a short file that looks whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from api.replies import ReplyListener, ReplyPiece, StreamEvent

log = structlog.get_logger(__name__)


class StreamBrokenError(Exception):
    """The stream cannot go on; raised inside the body's iterator to end the response abnormally."""


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether an Accept header admits `media_type`: the most specific range that matches it (type/subtype,
    type/*, */*) decides, and q=0 refuses; no Accept header (or an empty one) admits anything."""
    if accept is None or not accept.strip():
        return True
    qualities = dict(_media_range(part) for part in accept.split(",") if part.strip())
    main = media_type.split("/", 1)[0]
    for candidate in (media_type, f"{main}/*", "*/*"):
        if candidate in qualities:
            return qualities[candidate] > 0
    return False


def _media_range(part: str) -> tuple[str, float]:
    media, *params = (piece.strip() for piece in part.split(";"))
    quality = 1.0
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                quality = 0.0
    return media.lower(), quality


async def next_event(events: asyncio.Queue[StreamEvent], seconds: float) -> StreamEvent | None:
    """The job's next piece or its reply; None if neither came within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await events.get()
    except TimeoutError:
        return None


async def stream_pieces(
    replies: ReplyListener, job_id: str, events: asyncio.Queue[StreamEvent], first: ReplyPiece, seconds: float
) -> AsyncIterator[bytes]:
    """The body: `first`, then each following piece until the job's reply. The correlation id is forgotten when
    the body ends, however it ends (also when the client goes away: the iterator is cancelled or closed)."""
    sent = 0
    event: StreamEvent | None = first
    try:
        while isinstance(event, ReplyPiece):
            if event.offset != sent:
                raise _broken(job_id, sent, f"a piece at byte {event.offset} after {sent} bytes: the job started over")
            yield event.data
            sent += len(event.data)
            event = await next_event(events, seconds)
        if event is None:
            raise _broken(job_id, sent, f"nothing came for {seconds:g} s (SYNC_TIMEOUT_SECONDS)")
        if event.status == "failed":
            code = event.error.code if event.error is not None else "failed"
            raise _broken(job_id, sent, f"the job failed: {code}")
        log.info("stream_finished", job_id=job_id, size=sent)
    finally:
        replies.forget(job_id)


def _broken(job_id: str, sent: int, reason: str) -> StreamBrokenError:
    log.warning("stream_broken", job_id=job_id, bytes_sent=sent, reason=reason)
    return StreamBrokenError(f"job {job_id}: {reason}")
