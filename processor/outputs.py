"""Job outputs are created once: the first delivery of a job to store its output wins, and a later one (a
redelivery after a crash, or a duplicate on another processor) keeps that object instead of writing a second.

An output can be stored where every reader sees it before it is flushed to a local disk (durable=False): the
requester is answered sooner, and the settler flushes the output before the message is acked. A power failure
in between can lose the output or leave it empty while the message stays unacked; when it comes again,
`output_lost` says so and the job makes its output again (an empty object is never an output: it is replaced).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from infra.storage import ObjectStore, PreconditionFailedError
from processor.handlers.base import Job
from processor.outcomes import SETTLED_ELSEWHERE, Failed, SettledElsewhere
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)

_REPLACE_ROUNDS = 3


async def store_once(store: ObjectStore, key: str, data: bytes, content_type: str, *, durable: bool = True) -> bytes:
    """Create the object (If-None-Match: *) unless it exists; returns the bytes stored under the key: these, or
    those an earlier delivery of the same job stored. An empty object found there is replaced. With durable=False
    a local store does not flush it to the disk yet (ObjectStore.flush does, before the ack)."""
    for _ in range(_REPLACE_ROUNDS):
        try:
            await retry_transient(lambda: store.put(key, data, content_type, if_none_match=True, durable=durable))
            return data
        except PreconditionFailedError:
            existing = await retry_transient(lambda: store.get(key))
        if existing.data:
            log.info("output_already_stored", key=key)
            return existing.data
        log.warning("empty_output_replaced", key=key)
        try:
            await retry_transient(
                lambda etag=existing.etag: store.put(key, data, content_type, if_match=etag, durable=durable)
            )
            return data
        except PreconditionFailedError:
            continue  # another delivery wrote it meanwhile: read what it wrote
    return (await retry_transient(lambda: store.get(key))).data


async def store_output(
    job: Job, store: ObjectStore, key: str, data: bytes, content_type: str
) -> bytes | Failed | SettledElsewhere:
    """A job's generated output stored once (`store_once`, not flushed yet: the settler flushes it before the ack)
    if the job is still wanted (Job.still_wanted); the bytes stored under the key, or what the job reports instead
    (a storage outage is a transient failure)."""
    try:
        if not await job.still_wanted():
            return SETTLED_ELSEWHERE
        return await store_once(store, key, data, content_type, durable=False)
    except TRANSIENT_ERRORS as exc:
        return Failed("storage_unavailable", str(exc), transient=True)


def keyed_output(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The output of a job whose result names its one object under "key"."""
    key = result.get("key")
    return (key,) if isinstance(key, str) else ()


async def output_lost(store: ObjectStore, key: str) -> bool:
    """Whether a job's output is missing or empty: what a power failure can leave of one not yet flushed."""
    return not await retry_transient(lambda: store.size(key))
