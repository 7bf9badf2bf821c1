"""In-process retries for transient failures only (storage and Qdrant hiccups)."""

from __future__ import annotations

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

T = TypeVar("T")


def _log_retry(state: RetryCallState) -> None:
    log.warning(
        "transient_error_retrying",
        attempt=state.attempt_number,
        error=str(state.outcome.exception()) if state.outcome else None,
    )


async def retry_transient(operation: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
    """Run operation, retrying transient errors with exponential backoff and jitter; others pass through."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_random_exponential(multiplier=0.25, max=4.0),
        stop=stop_after_attempt(attempts),
        before_sleep=_log_retry,
        reraise=True,
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")
