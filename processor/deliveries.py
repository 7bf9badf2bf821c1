"""What a delivery says about its job: type, id, attempt number, whether an operator replayed it, whether it is a
suspect (and a deferred one)."""

from __future__ import annotations

import msgspec
from aio_pika.abc import AbstractIncomingMessage

from contract.bucket_events import BUCKET_EVENT, event_message_id
from infra.broker import ATTEMPTS_HEADER, DEFERRAL_HEADER
from processor.ops.headers import REPLAYED_AT_HEADER


class Deferral(msgspec.Struct):
    """What a suspect deferred while its job's run lives on carries (processor/liveness.py): the attempt it was
    deferred at, the seconds it has been deferred in all (the delay queues' times), and the heartbeat version it saw
    of each processor its job's marks named."""

    attempt: int
    seconds: float
    seen: dict[str, str] = msgspec.field(default_factory=dict)


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
    """Neither a suspect, nor a retry, nor an operator's replay: the message as it was published."""
    return not suspect(message) and attempt(message) == 1 and not replayed(message)


def suspect(message: AbstractIncomingMessage) -> bool:
    """Delivered again after an earlier delivery was not seen through (processor/interrupted_runs.py): redelivered by
    the broker, or the deferred copy of such a delivery."""
    return message.redelivered or deferral(message) is not None


def deferral(message: AbstractIncomingMessage) -> Deferral | None:
    """What a deferred copy of a suspect carries; None for any other delivery, including a retry or a dead letter of
    one (its attempt moved on; a replay drops the header) and one whose header cannot be read."""
    text = (message.headers or {}).get(DEFERRAL_HEADER)
    if not isinstance(text, str):
        return None
    try:
        found = msgspec.json.decode(text, type=Deferral)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return found if found.attempt == attempt(message) else None


def deferred(message: AbstractIncomingMessage, seen: dict[str, str], seconds: float) -> str:
    """The deferral header of a copy of this delivery that waited `seconds` more and saw the heartbeats `seen`."""
    earlier = deferral(message)
    total = seconds + (earlier.seconds if earlier is not None else 0.0)
    return msgspec.json.encode(Deferral(attempt(message), total, seen)).decode()


def replayed(message: AbstractIncomingMessage) -> bool:
    """Whether an operator replayed this message from the dead letters (`ams-ops dlq replay`)."""
    return bool((message.headers or {}).get(REPLAYED_AT_HEADER))
