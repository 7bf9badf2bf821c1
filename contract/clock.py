"""Creation timestamps that are unique and increasing within the (single) consumer."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class UniqueClock:
    def __init__(self) -> None:
        self._last = 0

    def now_us(self) -> int:
        """Microseconds since the epoch, strictly greater than the previous call's."""
        self._last = max(time.time_ns() // 1000, self._last + 1)
        return self._last


def iso_from_us(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC).isoformat().replace("+00:00", "Z")
