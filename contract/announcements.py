"""Announcing a job's end: its event on ams.events (contract/events.py, JOB_EVENTS_ENABLED) and, for a job with a
callback URL, its callback (contract/callbacks.py). Both are at least once, under the end's one event id."""

from __future__ import annotations

from contract.callbacks import publish_callback
from contract.events import JobFinishedV1, has_ended, job_finished, publish_event
from contract.jobs import JobRecord
from infra.broker import Publisher


def to_announce(record: JobRecord, events: bool) -> bool:
    """Whether the record's end is announced: it ended, and events are on or the job has a callback URL."""
    return has_ended(record) and (events or record.callback_url is not None)


async def announce(
    publisher: Publisher, routing_key: str, event: JobFinishedV1, *, events: bool, callback_url: str | None
) -> None:
    """Publish (confirmed) the callback, then the event; BrokerUnavailableError at the first RabbitMQ did not take
    (announced again whole, the callback may go twice: always under the same event id)."""
    if callback_url is not None:
        await publish_callback(publisher, callback_url, event)
    if events:
        await publish_event(publisher, routing_key, event)


async def announce_end(publisher: Publisher, record: JobRecord, *, events: bool) -> None:
    """Announce a finished record's end (to_announce says whether there is anything to announce)."""
    routing_key, event = job_finished(record)
    await announce(publisher, routing_key, event, events=events, callback_url=record.callback_url)
