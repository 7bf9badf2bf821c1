"""In-process retries for transient failures only (storage and Qdrant hiccups)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from infra.storage import StorageUnavailableError
from infra.vectors import VectorIndexUnavailableError

log = structlog.get_logger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailableError, VectorIndexUnavailableError)
FIRST_WAIT_SECONDS = 0.25  # the longest wait after the first failure; each later one may be twice the one before
MAX_WAIT_SECONDS = 4.0

T = TypeVar("T")


def _log_retry(attempt: int, error: BaseException | None) -> None:
    log.warning("transient_error_retrying", attempt=attempt, error=str(error) if error is not None else None)


def _log_later_retry(state: RetryCallState) -> None:
    # the retrier starts at the second attempt
    _log_retry(state.attempt_number + 1, state.outcome.exception() if state.outcome else None)


async def retry_transient(operation: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
    """Run operation, retrying transient errors with exponential backoff and jitter (up to `attempts` tries, the
    n-th wait drawn from 0..FIRST_WAIT_SECONDS * 2**(n-1), at most MAX_WAIT_SECONDS); others pass through. The
    first try runs bare: the retrier is built only after a transient failure (building it costs about 18 us, and
    every storage and index call of a job goes through here)."""
    try:
        return await operation()
    except TRANSIENT_ERRORS as exc:
        if attempts <= 1:
            raise
        _log_retry(1, exc)
    await asyncio.sleep(random.uniform(0, FIRST_WAIT_SECONDS))
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_random_exponential(multiplier=2 * FIRST_WAIT_SECONDS, max=MAX_WAIT_SECONDS),
        stop=stop_after_attempt(attempts - 1),
        before_sleep=_log_later_retry,
        reraise=True,
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")
