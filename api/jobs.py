"""Publishing a job and, for a waiting client, waiting for its reply."""

from __future__ import annotations

import msgspec

from api.services import Services
from infra.broker import Priority
from processor.contract import MSGPACK, JobReply, encode


async def submit(
    services: Services,
    *,
    message_type: str,
    payload: msgspec.Struct,
    job_id: str,
    wait: bool,
) -> JobReply | None:
    """Publish the job. With wait, it goes ahead of bulk work and the reply is awaited for up to
    SYNC_TIMEOUT_SECONDS; None means it is still queued or running."""
    body = encode(payload, MSGPACK)
    publisher = services.runtime.publisher
    if not wait:
        await publisher.publish(
            message_type=message_type,
            body=body,
            message_id=job_id,
            content_type=MSGPACK,
            priority=Priority.ASYNC,
        )
        return None
    replies = services.replies
    future = replies.expect(job_id)
    try:
        await publisher.publish(
            message_type=message_type,
            body=body,
            message_id=job_id,
            content_type=MSGPACK,
            priority=Priority.INTERACTIVE,
            reply_to=replies.queue_name,
            correlation_id=job_id,
        )
    except BaseException:
        replies.forget(job_id)
        raise
    return await replies.wait(job_id, future, services.settings.sync_timeout_seconds)
