"""What the consumer hands to a handler."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from processor.outcomes import Outcome


class PieceSink(Protocol):
    """Where a streamed job's output goes, piece by piece, as it is made (the requester's reply queue)."""

    async def send(self, data: bytes) -> None:
        """Send the next piece (nothing for empty data); the sink keeps the byte offset."""
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """A decoded message: its id, type, validated payload and priority; `pieces` when the requester asked for the
    output streamed (a handler that cannot stream ignores it); `marking`: its record's running mark being written
    (a job with a record); `attempt`: this delivery's attempt number (1 for the first)."""

    message_id: str
    message_type: str
    payload: Any
    priority: int
    pieces: PieceSink | None = None
    marking: asyncio.Task[bool] | None = None
    attempt: int = 1

    async def still_wanted(self) -> bool:
        """Whether the job may make its outputs, asked before its first lasting side effect (an object stored, a
        point written or deleted): True once its running mark is written (at once for a job without a record);
        False when the mark found the record settled: withdrawn by the API (whose client was told the job does not
        run), cancelled by its client, or finished by another delivery; the job then returns SETTLED_ELSEWHERE.
        Raises what the mark's write raised (the store unavailable): the job is retried. The mark and the API's
        withdrawal or cancellation are conditional writes on the same version of the record, so exactly one of the
        two is made."""
        return True if self.marking is None else await self.marking


class Handler(Protocol):
    message_type: str
    batch_size: int
    always_record: bool  # keep a job record even when the message does not ask for one
    pipelined: bool  # several batches may be in `handle` at once (the handler keeps its model stage in order)
    apart: bool  # network calls, not model work: scheduled apart from the models (processor/consumer.py)

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Process the jobs (one forward pass where the model allows) and return one outcome per job, in order."""
        ...


@runtime_checkable
class MakesOutputs(Protocol):
    """A handler whose jobs store an output that their result names (a generated image or voice): a job whose
    record says succeeded runs again when that output is lost (processor/outputs.py)."""

    def outputs(self, result: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys of the objects a succeeded job's result names as its output."""
        ...
