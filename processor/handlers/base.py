"""What the consumer hands to a handler."""

from __future__ import annotations

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
    output streamed (a handler that cannot stream ignores it)."""

    message_id: str
    message_type: str
    payload: Any
    priority: int
    pieces: PieceSink | None = None


class Handler(Protocol):
    message_type: str
    batch_size: int
    always_record: bool  # keep a job record even when the message does not ask for one
    reports_running: bool  # record the running state before the work starts (worth it for slow jobs)
    pipelined: bool  # several batches may be in `handle` at once (the handler keeps its model stage in order)

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
