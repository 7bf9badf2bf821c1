"""Which dead letters a command acts on: by message id, job type, reason code and time of the last failure."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from processor.ops.letters import DeadLetter, parse_timestamp

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True, slots=True)
class Selection:
    """Letters matching every given criterion; within one criterion any of the values matches.
    An empty selection matches every letter."""

    ids: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    since: dt.datetime | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.ids or self.types or self.reasons or self.since is not None)

    def matches(self, letter: DeadLetter) -> bool:
        if self.ids and letter.message_id not in self.ids:
            return False
        if self.types and letter.type not in self.types:
            return False
        if self.reasons and letter.reason_code not in self.reasons:
            return False
        if self.since is None:
            return True
        last_failure = letter.last_failure
        return last_failure is not None and last_failure >= self.since

    def apply(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        return [letter for letter in letters if self.matches(letter)]


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ISO-8601 (2026-11-25, 2026-11-25T10:30:00Z; no zone means UTC) or an age before now
    (90s, 30m, 2h, 1d, 1w). ValueError says what is accepted."""
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative[1]), relative[2].lower()
        return (now or dt.datetime.now(tz=dt.UTC)) - dt.timedelta(**{_UNITS[unit]: amount})
    moment = parse_timestamp(text.strip())
    if moment is None:
        raise ValueError(f"{text!r} is neither an ISO-8601 time (2026-11-25T10:30:00Z) nor an age (30m, 2h, 1d)")
    return moment
