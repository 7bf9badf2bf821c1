"""Job outputs are created once: the first delivery of a job to store its output wins, and a later one (a
redelivery after a crash, or a duplicate on another processor) keeps that object instead of writing a second."""

from __future__ import annotations

import structlog

from infra.storage import ObjectStore, PreconditionFailedError
from processor.retrying import retry_transient

log = structlog.get_logger(__name__)


async def store_once(store: ObjectStore, key: str, data: bytes, content_type: str) -> bytes:
    """Create the object (If-None-Match: *) unless it exists; returns the bytes stored under the key: these, or
    those an earlier delivery of the same job stored."""
    try:
        await retry_transient(lambda: store.put(key, data, content_type, if_none_match=True))
    except PreconditionFailedError:
        log.info("output_already_stored", key=key)
        return (await retry_transient(lambda: store.get(key))).data
    return data
