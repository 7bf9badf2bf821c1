"""What a handler reports for each job it was given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Succeeded:
    """`result` goes into the job record and the reply; `attachment` (e.g. the PNG) only into the reply;
    `unflushed`: the keys of outputs stored but not yet flushed to a local disk, which the settler flushes after
    the reply and before the ack (processor/outputs.py); `created`: the outputs this delivery created (key ->
    version), deleted again should the record turn out settled by another delivery without them
    (processor/outputs.py, drop_unrecorded)."""

    result: dict[str, Any] = field(default_factory=dict)
    attachment: bytes | None = None
    unflushed: tuple[str, ...] = ()
    created: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """`transient` failures are retried later; the others can never succeed and are dead-lettered. `retry_after`:
    the least wait before the retry that the failure asks for, in seconds (a callback receiver's Retry-After)."""

    code: str
    message: str
    transient: bool = False
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class CalledOff:
    """The job's record says it was stopped before it ran (contract/jobs.py): withdrawn by the API, or cancelled by
    its client. It made nothing (it was not run, or its work was dropped), and its message is acknowledged with
    nothing recorded or dead-lettered; a cancelled job's waiting requester is answered with its error."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class SettledElsewhere:
    """The job's record turned out settled when its running mark was written (Job.still_wanted): withdrawn by the
    API, cancelled by its client, or finished by another delivery. The job made nothing; the consumer settles it as
    its record says."""


SETTLED_ELSEWHERE = SettledElsewhere()

Outcome = Succeeded | Failed | SettledElsewhere  # what a handler reports
Settlement = Succeeded | Failed | CalledOff  # what the settler is given
