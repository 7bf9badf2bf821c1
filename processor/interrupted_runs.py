"""Counting the runs of a message that no processor lived to settle, so that a message that kills processors (out of
memory, a crash in native code, a fatal device error) is dead-lettered after MAX_INTERRUPTED_RUNS instead of
stopping every processor that takes it, one after the other, for ever.

RabbitMQ marks a delivery `redelivered` when an earlier delivery of the message was not acknowledged: its processor
died, lost its connection, or handed back what it had prefetched when it stopped. Such a delivery is a suspect: it
runs alone, with nothing beside it (processor/scheduler.py), so that if it kills this processor too, nothing else
goes down with it, and its count is raised in the object store before it runs (`processor/runs/<sha256 of the
message id>.json`, so every processor of a fleet sees it). A suspect that is settled has its count removed. The
first delivery is never counted (it may have died with the message, or only held it), so a suspect's interrupted
runs are its stored count plus one, and one that reaches MAX_INTERRUPTED_RUNS is dead-lettered without running
(code `interrupted`); an operator's replay (`ams-ops dlq replay`) runs it again once the cause is fixed.
"""

from __future__ import annotations

import hashlib
import json

import structlog

from infra.storage import ObjectNotFoundError, ObjectStore, PreconditionFailedError

log = structlog.get_logger(__name__)

RUNS_PREFIX = "processor/runs/"
INTERRUPTED = "interrupted"
_CONFLICT_ROUNDS = 5


def runs_key(message_id: str) -> str:
    return f"{RUNS_PREFIX}{hashlib.sha256(message_id.encode()).hexdigest()}.json"


class InterruptedRuns:
    def __init__(self, store: ObjectStore, limit: int) -> None:
        self._store = store
        self.limit = limit

    async def start(self, message_id: str) -> int:
        """Count a suspect's run before it starts; returns its interrupted runs so far. At `limit` or more nothing
        is written: the message is not to run again."""
        key = runs_key(message_id)
        for _ in range(_CONFLICT_ROUNDS):
            try:
                stored = await self._store.get(key)
            except ObjectNotFoundError:
                counted, etag = 0, None
            else:
                counted, etag = _runs(stored.data), stored.etag
            interrupted = counted + 1
            if interrupted >= self.limit:
                return interrupted
            body = json.dumps({"message_id": message_id, "runs": counted + 1}).encode()
            try:
                await self._store.put(key, body, "application/json", if_none_match=etag is None, if_match=etag)
            except PreconditionFailedError:
                continue
            return interrupted
        return interrupted

    async def clear(self, message_id: str) -> None:
        """The message is settled: forget its count."""
        await self._store.delete(runs_key(message_id))

    def message(self, interrupted: int) -> str:
        return (
            f"a processor stopped while running this message {interrupted} times (killed, out of memory, or a crash "
            f"in native code; MAX_INTERRUPTED_RUNS={self.limit}): it was dead-lettered so that it stops no more "
            "processors; `ams-ops dlq replay` runs it again once the cause is fixed"
        )


def _runs(data: bytes) -> int:
    """The stored count; one that cannot be read (a write a power failure cut short) counts as none."""
    try:
        return max(0, int(json.loads(data)["runs"]))
    except (ValueError, KeyError, TypeError):
        return 0
