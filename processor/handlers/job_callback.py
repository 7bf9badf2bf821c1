"""job.callback: POST a job's end to its callback URL (contract/callbacks.py), signed, on the client of
processor/handlers/callback_client.py (redirects not followed, public addresses only unless allowed).

The POSTs of a batch go out side by side; the answer's body is not read. 2xx: delivered. 408, 425, 429, 5xx, a
timeout (CALLBACK_TIMEOUT_SECONDS) or a connection failure: retried through the retry queues (no sooner than a
Retry-After asks, up to the longest delay queue's 120 s). Any other answer (a redirect included: following it could
lead anywhere): dead-lettered, as is a URL CALLBACK_HOSTS does not allow or a host that resolves to no address the
client may connect to. After each try, what became of it is written for GET /v1/jobs/{id} (contract/callback_states.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
import msgspec
import structlog

from contract.callback_states import CallbackState, CallbackStatus, write_state
from contract.callbacks import JOB_CALLBACK, CallbackUrlError, JobCallbackV1, check_callback_url, signature_headers
from contract.jobs import now_iso
from infra.storage import ObjectStore, StorageError
from processor.handlers.base import Job
from processor.handlers.callback_client import AddressNotAllowedError
from processor.outcomes import Failed, Outcome, Succeeded
from processor.retrying import retry_transient

log = structlog.get_logger(__name__)

BATCH_SIZE = 16  # POSTs sent side by side by one batch (and up to PIPELINE_DEPTH batches run at once)
RETRIED_STATUSES = frozenset({408, 425, 429})  # and every 5xx


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's wait in seconds (a number of seconds, or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class CallbackHandler:
    message_type = JOB_CALLBACK
    batch_size = BATCH_SIZE
    always_record = False
    pipelined = True
    apart = True

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        hosts: tuple[str, ...],
        secrets: tuple[bytes, ...],
        store: ObjectStore,
        max_attempts: int,
    ) -> None:
        self._client = client
        self._hosts = hosts
        self._secrets = secrets
        self._store = store
        self._max_attempts = max_attempts

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(job) for job in jobs)))

    async def _one(self, job: Job) -> Outcome:
        """One callback, on its own: an unforeseen error fails this one (dead-lettered, replayable), not the batch,
        whose other POSTs have gone out."""
        callback: JobCallbackV1 = job.payload
        try:
            outcome = await deliver(self._client, callback, hosts=self._hosts, secrets=self._secrets)
        except Exception as exc:
            log.exception("callback_crashed", job_id=callback.event.job_id, event_id=callback.event.event_id)
            outcome = Failed("internal_error", f"{type(exc).__name__}: {exc}")
        await self._record(job, callback, outcome)
        return outcome

    async def _record(self, job: Job, callback: JobCallbackV1, outcome: Succeeded | Failed) -> None:
        """Write what became of this try (contract/callback_states.py), best effort: the outcome stands either way."""
        if isinstance(outcome, Succeeded):
            status: CallbackStatus = "delivered"
            answer = f"answered {outcome.result['status_code']}"
        else:
            status = "retrying" if outcome.transient and job.attempt < self._max_attempts else "failed"
            answer = outcome.message
        state = CallbackState(
            event_id=callback.event.event_id, state=status, attempts=job.attempt, answer=answer, at=now_iso()
        )
        try:
            await retry_transient(lambda: write_state(self._store, callback.event.job_id, state), attempts=2)
        except StorageError as exc:  # unavailable, or a job id from upstream that is no key
            log.warning("callback_state_not_written", job_id=callback.event.job_id, error=str(exc))


async def deliver(
    client: httpx.AsyncClient, callback: JobCallbackV1, *, hosts: tuple[str, ...], secrets: tuple[bytes, ...]
) -> Succeeded | Failed:
    """POST one callback: Succeeded (2xx), a transient Failed (retried), or a permanent one, saying why."""
    event = callback.event
    bound = log.bind(job_id=event.job_id, event_id=event.event_id, url=callback.url)
    try:
        check_callback_url(callback.url, hosts)
    except CallbackUrlError as exc:
        bound.warning("callback_not_allowed", error=str(exc))
        return Failed("callback_not_allowed", str(exc))
    body = msgspec.json.encode(event)
    headers = {"content-type": "application/json", **signature_headers(secrets, event.event_id, int(time.time()), body)}
    started = time.perf_counter()
    try:
        async with client.stream("POST", callback.url, content=body, headers=headers) as response:
            status, reason = response.status_code, response.reason_phrase
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
    except (AddressNotAllowedError, httpx.InvalidURL, UnicodeError) as exc:  # UnicodeError: a name IDNA refuses
        bound.warning("callback_not_allowed", error=str(exc))
        return Failed("callback_not_allowed", f"POST {callback.url} not sent: {exc}")
    except httpx.HTTPError as exc:
        why = f"POST {callback.url} failed: {type(exc).__name__}: {exc}".rstrip(": ")
        bound.warning("callback_failed", error=why)
        return Failed("callback_failed", why, transient=True)
    seconds = round(time.perf_counter() - started, 3)
    if 200 <= status < 300:
        bound.info("callback_delivered", status=status, seconds=seconds)
        return Succeeded({"job_id": event.job_id, "event_id": event.event_id, "status_code": status})
    answer = f"POST {callback.url} answered {status} {reason}".rstrip()
    if status in RETRIED_STATUSES or status >= 500:
        bound.warning("callback_failed", status=status, seconds=seconds, retry_after=retry_after)
        return Failed("callback_failed", answer, transient=True, retry_after=retry_after)
    bound.warning("callback_refused", status=status, seconds=seconds)
    return Failed("callback_refused", f"{answer}; not retried (only 408, 425, 429 and 5xx answers are)")
