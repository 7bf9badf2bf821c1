"""Starting jobs: record, publish, and (for a waiting client) wait for the reply.

A job is recorded as queued in the object store before it is published, so its status can be read at once and
survives restarts. With an Idempotency-Key the job id is derived from the key, so a retried request finds the
job it started the first time instead of starting another.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.status_codes import HTTP_202_ACCEPTED

from api.errors import RETRY_AFTER_SECONDS, ApiError
from api.replies import StreamEvent
from api.resend import Resend
from api.schemas import JobAccepted
from api.services import Services
from api.urls import job_url
from contract import metrics
from contract.announcements import announce_end, to_announce
from contract.callbacks import CallbackUrlError, check_callback_url
from contract.jobs import (
    CANCELLED,
    FINISHED,
    JobRecord,
    JobStore,
    NoOutputError,
    NotCancellableError,
    OutputDeleted,
    cancel_queued,
    cancellation,
    delete_job_output,
    is_withdrawn,
    job_id_for_idempotency_key,
    never_started,
    record_headers,
    record_params,
    withdrawn,
)
from contract.messages import MSGPACK, STREAM_HEADER, JobReply, encode, is_blank, output_key
from infra.broker import BrokerUnavailableError, Priority
from infra.storage import ObjectNotFoundError, PreconditionFailedError, StorageUnavailableError

log = structlog.get_logger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# a request whose Idempotency-Key found its job unfinished reads the record again after these pauses, doubling
SETTLED_FIRST_PAUSE_SECONDS = 0.02
SETTLED_MAX_PAUSE_SECONDS = 0.5
# the longest long poll of GET /v1/jobs/{id}?wait_seconds=: under the read timeouts of common proxies (60 s)
MAX_WAIT_SECONDS = 30

# reply error codes that are the client's to fix, and what they answer
_CLIENT_ERRORS = {
    "index_full": 409,
    "feature_disabled": 503,
    "reference_not_found": 404,
    "invalid_key": 400,
    "text_too_long": 400,
    "audio_too_large": 413,
    CANCELLED: 409,
}


@dataclass(frozen=True, slots=True)
class JobStart:
    """What became of a request to start a job: its record, and the reply if the client waited for one; for a
    streamed job, the queue its pieces and then its reply arrive on instead."""

    record: JobRecord
    reply: JobReply | None
    existing: bool = False
    events: asyncio.Queue[StreamEvent] | None = None


def job_store(services: Services) -> JobStore:
    return JobStore(services.store, services.settings.job_record_ttl_days)


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if is_blank(key) or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ApiError(
            400, "invalid_idempotency_key", f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    return key


def allowed_callback_url(services: Services, url: str | None) -> str | None:
    """A job's callback URL, when CALLBACK_HOSTS allows it (422 callback_not_allowed otherwise)."""
    if url is None:
        return None
    try:
        return check_callback_url(url, services.settings.callback_hosts)
    except CallbackUrlError as exc:
        raise ApiError(422, "callback_not_allowed", str(exc)) from None


def _existing(existing: JobRecord, recorded: dict[str, Any], callback_url: str | None) -> None:
    """Refuses a request whose Idempotency-Key already started a job that asks for something else."""
    if existing.params != msgspec.json.decode(msgspec.json.encode(recorded)) or existing.callback_url != callback_url:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request; use a new key",
        )


async def _found(
    jobs: JobStore, record: JobRecord, wait: bool, seconds: float, gone: asyncio.Future[None] | None
) -> JobStart:
    """The job an Idempotency-Key already started. A request that waits for its result (a retry after a lost
    connection, or the same request sent twice at once) waits for the job as the first one does, up to `seconds`
    (SYNC_TIMEOUT_SECONDS) or until its client has `gone`, reading its record: the reply goes to the first request,
    perhaps in another process."""
    if wait:
        record = await _settled(jobs, record, seconds, gone)
    return JobStart(record, None, existing=True)


async def watch_job(
    jobs: JobStore,
    record: JobRecord,
    seconds: float,
    done: Callable[[JobRecord], bool],
    interrupt: asyncio.Event | None = None,
) -> JobRecord | None:
    """The job's record once `done` holds for it, or as it is after `seconds` (or, read once more, when
    `interrupt` is set); None once the record is gone. The record is read again after pauses of 20 ms, doubling
    to 0.5 s: the change may come from any process."""
    pause = SETTLED_FIRST_PAUSE_SECONDS
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    interrupt = interrupt or asyncio.Event()
    while not done(record) and loop.time() < deadline and not interrupt.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(pause, max(0.0, deadline - loop.time()))):
                await interrupt.wait()
        pause = min(pause * 2, SETTLED_MAX_PAUSE_SECONDS)
        current = await jobs.get(record.job_id)
        if current is None:
            return None
        record = current
    return record


def finished(record: JobRecord) -> bool:
    return record.status in FINISHED


async def next_state(request: Request, services: Services, record: JobRecord, seconds: float) -> JobRecord | None:
    """A job's long poll: its record once its status is no longer `record`'s (or it is finished), or as it is
    after `seconds`; at once when the server is asked to stop, and without further reads once the client has
    gone. None once the record is gone."""
    status = record.status

    def moved_on(current: JobRecord) -> bool:
        return current.status != status or finished(current)

    interrupt = asyncio.Event()
    watchers = [asyncio.ensure_future(_client_gone(request)), asyncio.ensure_future(services.stopping.wait())]
    for watcher in watchers:
        watcher.add_done_callback(lambda _: interrupt.set())
    try:
        return await watch_job(job_store(services), record, seconds, moved_on, interrupt)
    finally:
        for watcher in watchers:
            watcher.cancel()


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection. A request whose body has been read (a GET has none) has
    nothing more to receive until then."""
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


async def _settled(jobs: JobStore, record: JobRecord, seconds: float, gone: asyncio.Future[None] | None) -> JobRecord:
    """The job's record once it is finished, or as it is after `seconds` (or once the client has `gone`). A job the
    first request's failed publish removed or withdrew meanwhile is answered as that request was: 503, and the key
    starts the job afresh."""
    interrupt = asyncio.Event()
    if gone is not None:
        gone.add_done_callback(lambda _: interrupt.set())
    current = await watch_job(jobs, record, seconds, finished, interrupt)
    if current is None:
        raise _not_accepted(record.job_id, "its message could not be sent to the broker")
    record = current
    if is_withdrawn(record):
        raise _not_accepted(record.job_id, record.error.message if record.error is not None else "withdrawn")
    return record


def _not_accepted(job_id: str, why: str) -> ApiError:
    return ApiError(
        503,
        "broker_unavailable",
        f"job {job_id} was not accepted ({why}); retry shortly with the same Idempotency-Key",
        retry_after=RETRY_AFTER_SECONDS,
    )


async def start_job(
    services: Services,
    *,
    job_type: str,
    payload: msgspec.Struct,
    wait: bool,
    idempotency_key: str | None = None,
    params: dict[str, Any] | None = None,
    job_id: str | None = None,
    stream: bool = False,
    admit: Callable[[], Awaitable[None]] | None = None,
    callback_url: str | None = None,
    request: Request | None = None,
) -> JobStart:
    """Record and publish a job (or find the one this Idempotency-Key already started). With `stream`, the job
    is asked to send its output in pieces, and they come on the result's `events` (the caller forgets them).
    `admit` checks what a new job needs (raising the ApiError that refuses it); a job the key found skips it.
    `callback_url`: where the job's end is POSTed (checked against CALLBACK_HOSTS by the caller). `request`: the
    waiting client's, whose body has been read; a wait ends once that client has gone (the job goes on, and its
    record and output are kept), as it would past SYNC_TIMEOUT_SECONDS."""
    gone = asyncio.ensure_future(_client_gone(request)) if request is not None and (wait or stream) else None
    try:
        return await _start_job(
            services,
            job_type=job_type,
            payload=payload,
            wait=wait,
            idempotency_key=idempotency_key,
            params=params,
            job_id=job_id,
            stream=stream,
            admit=admit,
            callback_url=callback_url,
            gone=gone,
        )
    finally:
        if gone is not None:
            gone.cancel()


async def _start_job(
    services: Services,
    *,
    job_type: str,
    payload: msgspec.Struct,
    wait: bool,
    idempotency_key: str | None,
    params: dict[str, Any] | None,
    job_id: str | None,
    stream: bool,
    admit: Callable[[], Awaitable[None]] | None,
    callback_url: str | None,
    gone: asyncio.Future[None] | None,
) -> JobStart:
    jobs = job_store(services)
    recorded = record_params(payload) if params is None else params
    key = check_idempotency_key(idempotency_key)
    restarted_version: str | None = None
    if key is not None:
        job_id = job_id_for_idempotency_key(job_type, key)
        found = await jobs.load(job_id)
        if found is not None:
            _existing(found[0], recorded, callback_url)
            if not _starts_again(found[0]):
                if never_started(found[0]):  # its message may never have left: api/resend.py
                    priority = Priority.INTERACTIVE if wait or stream else Priority.ASYNC
                    services.resender.watch(found[0], found[1], Resend(job_type, payload, priority))
                return await _found(jobs, found[0], wait or stream, services.settings.sync_timeout_seconds, gone)
            restarted_version = found[1]
    if admit is not None:
        await admit()
    job_id = job_id or str(uuid.uuid4())
    record = JobStore.new(job_id, job_type, recorded, idempotency_key=key, callback_url=callback_url)
    try:
        # queued: the processor makes it again if a power failure loses it
        if restarted_version is None:
            version = await jobs.create(record, durable=False)
        else:
            version = await jobs.update(record, restarted_version, durable=False)
    except PreconditionFailedError:
        # a concurrent request with the same Idempotency-Key created it first
        existing = await jobs.get(job_id)
        if existing is None:
            raise
        _existing(existing, recorded, callback_url)
        return await _found(jobs, existing, wait or stream, services.settings.sync_timeout_seconds, gone)
    except StorageUnavailableError as exc:  # the store may have taken the write without answering
        services.withdrawals.owe(record, str(exc), remove=True)
        raise
    if key is not None:
        await _clear_earlier_output(services, jobs, record)
    headers = record_headers(record, version)
    try:
        if stream:
            events = await _publish_streamed(services, job_type, payload, job_id, headers)
            return JobStart(record, None, events=events)
        reply = await _publish(services, job_type, payload, job_id, wait, headers, gone)
    except BrokerUnavailableError as exc:
        # shielded: the withdrawal is written (or the job found accepted) even if the client leaves meanwhile
        taken = await asyncio.shield(_withdraw(services, jobs, record, version, exc))
        if taken is None:
            raise
        return JobStart(taken, None)
    return JobStart(record, reply)


async def _clear_earlier_output(services: Services, jobs: JobStore, record: JobRecord) -> None:
    """Delete the output an earlier job of this Idempotency-Key left, before the new job's message leaves: the key
    names the job id, so the output's key too, and a generation keeps an output it finds under its key (a
    redelivery's), which would answer this request with the earlier one's image or voice. An output outlives its
    record without OUTPUT_TTL_DAYS, so the key's record having expired or gone says nothing of it. When the store
    does not answer, the new record goes too (nothing left behind) and the client gets the store's 503."""
    output = output_key(record.type, record.job_id)
    if output is None:
        return
    try:
        if await services.store.delete(output):
            log.info("earlier_output_deleted", job_id=record.job_id, key=output)
    except StorageUnavailableError as exc:
        try:
            await jobs.delete(record.job_id)
        except StorageUnavailableError:
            services.withdrawals.owe(record, str(exc), remove=True)
        raise


def _starts_again(record: JobRecord) -> bool:
    """Whether a request with the Idempotency-Key of this job starts it afresh: its client was told to retry (503
    with Retry-After), because the job was withdrawn (never accepted), or because it failed on a dependency that
    stayed down past its attempts (a `*_unavailable` code: the object store, the index)."""
    if is_withdrawn(record):
        return True
    return record.status == "failed" and record.error is not None and record.error.code.endswith("_unavailable")


async def _withdraw(
    services: Services, jobs: JobStore, record: JobRecord, version: str, failure: BrokerUnavailableError
) -> JobRecord | None:
    """After a failed publish: remove the record of a message that never left (nothing is left behind), or mark
    the job withdrawn when the message may still reach its queue (a processor then makes nothing of it), so the
    503 the client gets stays true. Both the mark and a processor's running mark are conditional on the version
    written before the publish: a processor that took the job first means it was accepted after all, and its
    record comes back, to be answered as a job still running. When the store does not answer, the withdrawal is
    owed (api/withdrawals.py)."""
    try:
        if failure.unsent:
            await jobs.delete(record.job_id)
            return None
        await jobs.update(withdrawn(record, str(failure)), version)
        log.warning("job_withdrawn", job_id=record.job_id, error=str(failure))
    except PreconditionFailedError:
        taken = await jobs.get(record.job_id)
        if taken is not None and not is_withdrawn(taken):
            log.warning("job_accepted_without_confirm", job_id=record.job_id, status=taken.status)
            return taken
    except StorageUnavailableError as exc:  # the client still gets the broker's 503
        log.warning("job_not_withdrawn", job_id=record.job_id, error=str(exc))
        services.withdrawals.owe(record, str(failure), remove=failure.unsent)
    return None


async def cancel_job(services: Services, job_id: str) -> JobRecord:
    """Cancel a queued job (contract/jobs.py cancel_queued): it never runs, and a request in this process that
    waits for it is answered at once (one waiting elsewhere by the processor that takes its message)."""
    try:
        done = await cancel_queued(job_store(services), job_id)
    except NotCancellableError as exc:
        raise ApiError(409, "job_not_cancellable", str(exc)) from None
    if done is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    if not done.already:
        services.replies.deliver(job_id, JobReply(job_id=job_id, status="failed", error=cancellation(job_id)))
        if to_announce(done.record, services.settings.job_events_enabled):
            await _announce_cancellation(services, done.record)
    return done.record


async def delete_output(services: Services, job_id: str) -> JobRecord:
    """Delete a succeeded generation's output now (contract/jobs.py delete_job_output): 404 for an unknown job or one
    without such an output, 409 for one not finished."""
    try:
        done = await delete_job_output(job_store(services), job_id)
    except NoOutputError as exc:
        raise ApiError(404 if exc.code == "no_output" else 409, exc.code, str(exc)) from None
    if done is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    return done.record


async def _announce_cancellation(services: Services, record: JobRecord) -> None:
    """Announce a cancelled job's end at once. Should RabbitMQ not take the event, the processor that takes the
    job's message announces it then (the same event), so the cancellation itself stands."""
    try:
        await announce_end(services.publisher, record, events=services.settings.job_events_enabled)
    except BrokerUnavailableError as exc:
        metrics.job_events("deferred")
        log.warning("job_event_deferred", job_id=record.job_id, error=str(exc))
    else:
        metrics.job_events("published")


async def _publish(
    services: Services,
    job_type: str,
    payload: msgspec.Struct,
    job_id: str,
    wait: bool,
    headers: dict[str, object],
    gone: asyncio.Future[None] | None,
) -> JobReply | None:
    body = encode(payload, MSGPACK)
    publisher = services.publisher
    if not wait:
        await publisher.publish(
            message_type=job_type,
            body=body,
            message_id=job_id,
            content_type=MSGPACK,
            priority=Priority.ASYNC,
            headers=headers,
        )
        return None
    replies = services.replies
    future = replies.expect(job_id)
    try:
        await publisher.publish(
            message_type=job_type,
            body=body,
            message_id=job_id,
            content_type=MSGPACK,
            priority=Priority.INTERACTIVE,
            reply_to=replies.queue_name,
            correlation_id=job_id,
            headers=headers,
        )
    except BaseException:
        replies.forget(job_id)
        raise
    reply = await replies.wait(job_id, future, services.settings.sync_timeout_seconds, gone)
    if reply is None and gone is not None and gone.done():
        log.info("client_disconnected", job_id=job_id, waited_for=job_type)
    return reply


async def _publish_streamed(
    services: Services, job_type: str, payload: msgspec.Struct, job_id: str, headers: dict[str, object]
) -> asyncio.Queue[StreamEvent]:
    """Publish a job whose requester waits for its output in pieces (STREAM_HEADER)."""
    replies = services.replies
    events = replies.expect_stream(job_id)
    try:
        await services.publisher.publish(
            message_type=job_type,
            body=encode(payload, MSGPACK),
            message_id=job_id,
            content_type=MSGPACK,
            priority=Priority.INTERACTIVE,
            reply_to=replies.queue_name,
            correlation_id=job_id,
            headers={**headers, STREAM_HEADER: True},
        )
    except BaseException:
        replies.forget(job_id)
        raise
    return events


async def finished_result(started: JobStart) -> dict[str, Any] | None:
    """The job's result if it is finished; raises the job's error if it failed; None while it runs."""
    if started.reply is not None:
        if started.reply.status == "failed" and started.reply.error is not None:
            raise_for_failure(started.reply.error.code, started.reply.error.message)
        return started.reply.result
    record = started.record
    if record.status == "failed" and record.error is not None:
        raise_for_failure(record.error.code, record.error.message)
    if record.output_deleted is not None:
        raise _output_gone(record, record.output_deleted)
    return record.result if record.status == "succeeded" else None


def _output_gone(record: JobRecord, deleted: OutputDeleted) -> ApiError:
    """410 for a request whose Idempotency-Key names a job whose output was deleted on purpose."""
    why = (
        "as this server deletes generated outputs OUTPUT_TTL_DAYS after their job finished"
        if deleted.reason == "expired"
        else "as its client asked (DELETE /v1/jobs/{id}/output)"
    )
    return ApiError(
        410,
        f"output_{deleted.reason}",
        f"the output of job {record.job_id} was deleted at {deleted.at}, {why}; send the request again with a new "
        "Idempotency-Key to make it again",
    )


async def output_bytes(services: Services, started: JobStart, result: dict[str, Any]) -> bytes:
    """A finished job's output: carried by the reply when this request waited for it, else read from storage. One
    that is missing or empty there is a 503 (a power failure before it was flushed: its job is being run again), or
    a 410 when it was deleted on purpose meanwhile (OUTPUT_TTL_DAYS, DELETE /v1/jobs/{id}/output)."""
    attachment = started.reply.attachment if started.reply is not None else None
    if attachment is not None:
        return attachment
    try:
        data = (await services.store.get(result["key"])).data
    except ObjectNotFoundError:
        data = b""
    if not data:
        record = await job_store(services).get(started.record.job_id)
        if record is not None and record.output_deleted is not None:
            raise _output_gone(record, record.output_deleted)
        raise ApiError(
            503,
            "output_unavailable",
            f"the output of job {started.record.job_id} is being made again; retry shortly",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return data


def require_r2(services: Services, instead: str) -> None:
    """The /v1/r2/... endpoints answer only with R2 enabled; `instead` names the endpoint to use without it."""
    if not services.settings.r2_enabled:
        raise ApiError(503, "r2_disabled", f"R2 is disabled on this server (R2_ENABLED=0); use {instead}")


def raise_for_failure(code: str, message: str) -> None:
    """Turn a failed job's error into the HTTP error it deserves."""
    if code.endswith("_unavailable"):
        raise ApiError(503, code, message, retry_after=RETRY_AFTER_SECONDS)
    if code == "internal_error":
        raise ApiError(500, code, message)
    raise ApiError(_CLIENT_ERRORS.get(code, 422), code, message)


def accepted(request: Request, services: Services, record: JobRecord) -> Response[JobAccepted]:
    """202 with the job's id and the URL to poll (also in the Location header)."""
    url = job_url(request, services.settings, record.job_id)
    return Response(
        JobAccepted(job_id=record.job_id, status=record.status, status_url=url),
        status_code=HTTP_202_ACCEPTED,
        headers={"Location": url},
    )
