"""What became of a job's callback (contract/callbacks.py), as `GET /v1/jobs/{id}` shows it: `callbacks/<job id>.json`,
written by the processor after each try of the callback of the job's latest end (best effort: a callback is sent
whether or not its state could be written), and deleted JOB_RECORD_TTL_DAYS after its last try (conditionally on
the state read: a try that writes a fresh one meanwhile keeps it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

import msgspec

from infra.storage import ObjectNotFoundError, ObjectStore

STATES_PREFIX = "callbacks/"

CallbackStatus = Literal["delivered", "retrying", "failed"]


class CallbackState(msgspec.Struct, kw_only=True):
    """The last try of the callback announcing the end `event_id`: delivered (a 2xx), retrying (it failed and is
    tried again later), or failed (not delivered: dead-lettered); `answer` is what the receiver answered, or why
    the callback was not sent."""

    event_id: str
    state: CallbackStatus
    attempts: int
    answer: str
    at: str


def state_key(job_id: str) -> str:
    return f"{STATES_PREFIX}{job_id}.json"


async def read_state(store: ObjectStore, job_id: str) -> CallbackState | None:
    """The state written for the job's callback; None when there is none (or it cannot be read)."""
    try:
        stored = await store.get(state_key(job_id))
    except ObjectNotFoundError:
        return None
    try:
        return msgspec.json.decode(stored.data, type=CallbackState)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def write_state(store: ObjectStore, job_id: str, state: CallbackState) -> None:
    await store.put(state_key(job_id), msgspec.json.encode(state), "application/json")


async def stored_states(
    store: ObjectStore, written_before: datetime | None = None
) -> AsyncIterator[tuple[str, CallbackState | None, str]]:
    """Every state object's key, state (None: unreadable) and version (ETag, for a delete conditional on it), one
    read each; with `written_before`, only those the listing says were last written before then (the others are not
    read)."""
    async for info in store.list(STATES_PREFIX):
        if written_before is not None and info.modified >= written_before:
            continue
        try:
            stored = await store.get(info.key)
        except ObjectNotFoundError:
            continue
        try:
            state: CallbackState | None = msgspec.json.decode(stored.data, type=CallbackState)
        except (msgspec.DecodeError, msgspec.ValidationError):
            state = None
        yield info.key, state, stored.etag
