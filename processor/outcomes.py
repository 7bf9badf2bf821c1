"""What a handler reports for each job it was given."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Succeeded:
    """`result` goes into the job record and the reply; `attachment` (e.g. the PNG) only into the reply. `then` is
    work that can follow the answer: it runs once the message is acknowledged, so a crash may lose it; only for
    what can be made again (an image's thumbnail, which the API makes when it finds none)."""

    result: dict[str, Any] = field(default_factory=dict)
    attachment: bytes | None = None
    then: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Failed:
    """`transient` failures are retried later; the others can never succeed and are dead-lettered."""

    code: str
    message: str
    transient: bool = False


Outcome = Succeeded | Failed
