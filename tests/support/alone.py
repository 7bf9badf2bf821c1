"""Tests marked `alone` run while no other test runs: the timing tests, which the other xdist worker's load on the
same two cores would otherwise decide.

Every other test holds a shared lock on a file all workers of one run see, from its setup to its teardown; an `alone`
test takes it exclusively for its call. A turnstile lock in front keeps the other workers from starving it: once an
`alone` test waits, their next tests wait behind it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MARK = "alone"


def lock_dir(config: pytest.Config) -> Path | None:
    """The folder shared by the workers of this run (None without xdist workers: nothing to keep apart)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return None
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    return factory.getbasetemp().parent


@contextmanager
def held(folder: Path | None, *, exclusive: bool) -> Iterator[None]:
    if folder is None:
        yield
        return
    with open(folder / "alone.turnstile", "a") as turnstile, open(folder / "alone.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
