"""What a delivery says about its job: type, id, attempt number, whether an operator replayed it."""

from __future__ import annotations

from aio_pika.abc import AbstractIncomingMessage

from contract.bucket_events import BUCKET_EVENT, event_message_id
from infra.broker import ATTEMPTS_HEADER
from processor.ops.headers import REPLAYED_AT_HEADER


def attempt(message: AbstractIncomingMessage) -> int:
    """This delivery's attempt number (1 for the first): one more than the attempts its `x-ams-attempts` header says
    were made. The header is the processor's own (on the retries it publishes); one that a publisher set to
    something that is not a whole number of at least 0 counts as none made."""
    made = (message.headers or {}).get(ATTEMPTS_HEADER)
    try:
        return max(int(made or 0), 0) + 1
    except (TypeError, ValueError, OverflowError):
        return 1


def job_type(message: AbstractIncomingMessage) -> str:
    """The job type: the AMQP `type`, or `bucket.event` for notifications routed with that key (MinIO and
    other notifiers cannot set `type`)."""
    if message.type:
        return message.type
    return BUCKET_EVENT if message.routing_key == BUCKET_EVENT else ""


def job_id(message: AbstractIncomingMessage) -> str | None:
    """The AMQP `message_id`; a bucket event without one gets a stable id derived from its body."""
    if message.message_id:
        return message.message_id
    return event_message_id(message.body) if job_type(message) == BUCKET_EVENT else None


def first_delivery(message: AbstractIncomingMessage) -> bool:
    """Neither redelivered by the broker, nor a retry, nor an operator's replay: the message as it was published."""
    return not message.redelivered and attempt(message) == 1 and not replayed(message)


def replayed(message: AbstractIncomingMessage) -> bool:
    """Whether an operator replayed this message from the dead letters (`ams-ops dlq replay`)."""
    return bool((message.headers or {}).get(REPLAYED_AT_HEADER))
