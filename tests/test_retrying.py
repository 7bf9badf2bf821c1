"""In-process retries: transient failures are tried again with growing, jittered waits, up to the attempts asked;
anything else passes through at once; a first try that succeeds builds no retrier."""

from __future__ import annotations

import time

import pytest
import structlog

import processor.retrying as retrying
from infra.storage import PreconditionFailedError, StorageUnavailableError
from infra.vectors import VectorIndexUnavailableError
from processor.retrying import retry_transient


def failing(*errors: BaseException):
    """An operation that raises `errors` in turn, then returns how many calls it took."""
    calls: list[int] = []

    async def operation() -> int:
        calls.append(len(calls) + 1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return len(calls)

    return operation, calls


async def test_a_first_success_builds_no_retrier(monkeypatch):
    def no_retrier(*args, **kwargs):
        raise AssertionError("a retrier was built for a call that succeeded at once")

    monkeypatch.setattr(retrying, "AsyncRetrying", no_retrier)
    operation, calls = failing()
    assert await retry_transient(operation) == 1
    assert calls == [1]


async def test_transient_failures_are_tried_again_with_growing_waits(monkeypatch):
    monkeypatch.setattr(retrying, "FIRST_WAIT_SECONDS", 0.02)
    operation, calls = failing(StorageUnavailableError("a"), VectorIndexUnavailableError("b"))
    with structlog.testing.capture_logs() as logs:
        assert await retry_transient(operation) == 3
    assert calls == [1, 2, 3]
    assert [entry["attempt"] for entry in logs if entry["event"] == "transient_error_retrying"] == [1, 2]


async def test_the_last_transient_failure_is_raised_after_the_attempts_asked(monkeypatch):
    monkeypatch.setattr(retrying, "FIRST_WAIT_SECONDS", 0.02)
    operation, calls = failing(*(StorageUnavailableError(str(n)) for n in range(5)))
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"^2$"):
        await retry_transient(operation, attempts=3)
    assert calls == [1, 2, 3]
    assert time.monotonic() - started < 1.0  # waits of at most 0.02 and 0.04 s
    operation, calls = failing(StorageUnavailableError("once"))
    with pytest.raises(StorageUnavailableError):
        await retry_transient(operation, attempts=1)
    assert calls == [1]


async def test_other_errors_pass_through_at_once():
    operation, calls = failing(PreconditionFailedError("k", "If-Match: x"))
    with pytest.raises(PreconditionFailedError):
        await retry_transient(operation)
    assert calls == [1]
    operation, calls = failing(StorageUnavailableError("first"), ValueError("then a bug"))
    with pytest.raises(ValueError):
        await retry_transient(operation)
    assert calls == [1, 2]
