"""Job records: the durable state of a job, kept in the object store as jobs/<id>.json.

Whoever changes a job's state writes its record: the API creates it (queued) before publishing, the processor
marks it running, succeeded or failed before it acknowledges the message. Records survive restarts. Every write
is conditional (create only if absent, update only the version read: processor/tracking.py), so two deliveries
of one job on two processors never move a record backwards. A finished record expires JOB_RECORD_TTL_DAYS after
it finished: it reads as absent, and processors delete expired records (`sweep`). With OUTPUT_TTL_DAYS set, the
sweep also deletes a generation's output that long after it finished, as DELETE /v1/jobs/{id}/output does at once;
the record says so (output_deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import structlog

from contract import metrics
from contract.callback_states import stored_states
from contract.errors import ErrorInfo
from infra.storage import ObjectNotFoundError, ObjectStore, PreconditionFailedError

log = structlog.get_logger(__name__)

JOBS_PREFIX = "jobs/"
READ_AHEAD = 32  # records read at once when all are read (listing, sweep)
RECORD_HEADER = "x-ams-job-record"  # the API recorded this job: the processor keeps its record up to date
# the queued record as the API wrote it (JSON) and its version (ETag): a first delivery need not read it back
QUEUED_RECORD_HEADER = "x-ams-job-record-queued"
QUEUED_VERSION_HEADER = "x-ams-job-record-version"
_IDEMPOTENCY_NAMESPACE = uuid.UUID("0f3f3c35-7d59-4bb4-9f43-3f2f35f1f6a1")

JobStatus = Literal["queued", "running", "succeeded", "failed"]
FINISHED = ("succeeded", "failed")
# where generations store their outputs (<prefix><job id>.png / .mp3): the only objects that expire with
# OUTPUT_TTL_DAYS
GENERATED_IMAGES = "images/generated/"
GENERATED_VOICES = "voice/generated/"
GENERATED_PREFIXES = (GENERATED_IMAGES, GENERATED_VOICES)

# The error code of a job the API withdrew: its message went unconfirmed (RabbitMQ blocked or the connection lost
# while publishing), so the client was answered 503, but the message may still reach its queue. The withdrawal is
# a conditional write on the queued version the message carries, and so is a processor's running mark, which a job
# waits for before its first lasting side effect: exactly one of the two is written, so a withdrawn job makes
# nothing, and a job whose mark came first was accepted after all (processor/consumer.py, api/jobs.py).
WITHDRAWN = "withdrawn"
# The error code of a job its client cancelled while it was queued (POST /v1/jobs/{id}/cancel): the same
# conditional write on the queued version as a withdrawal, so a cancelled job makes nothing and a job whose running
# mark came first is not cancelled. Unlike a withdrawn job's, its Idempotency-Key keeps answering with it.
CANCELLED = "cancelled"
# a cancellation that meets a write made meanwhile (the job's running mark, a retry's) reads the record again
_CANCEL_ROUNDS = 5
# A record still queued and never attempted this long after its stamp is past any publish of the request that
# wrote it (a publish waits at most 10 s for its confirm): if its message never left (the API stopped between the
# record and the publish), nothing else will send it. An Idempotency-Key retry of such a job sends its message
# again (api/resend.py): at worst a duplicate of one still waiting in the queue, which makes nothing once the job
# is settled (its running mark finds the record settled) or runs once more, converging on the same record and
# output.
RESEND_AFTER_SECONDS = 15.0
# how much earlier than due a sweep reads what the listing says was last written: the store's clock may differ from
# this host's (R2's from this server's), and a record's last write comes a little after the finish it stamps
SWEEP_LEEWAY = timedelta(hours=1)


def iso_stamp(moment: datetime) -> str:
    """A record's stamp of a moment: ISO 8601 in UTC, microseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_iso() -> str:
    return iso_stamp(datetime.now(tz=UTC))


def parse_stamp(stamp: str) -> datetime:
    """The moment of an ISO stamp written by now_iso (ValueError when it is none; UTC when it names no offset)."""
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def age_seconds(stamp: str, now: datetime | None = None) -> float:
    """Seconds since an ISO stamp written by now_iso (negative when the writer's clock is ahead)."""
    return ((now or datetime.now(tz=UTC)) - parse_stamp(stamp)).total_seconds()


def _older(stamp: str, now: datetime, ttl: timedelta) -> bool:
    """Whether an ISO stamp is older than `ttl` (a stamp that cannot be read counts as old)."""
    try:
        return age_seconds(stamp, now) > ttl.total_seconds()
    except ValueError:
        return True


def job_id_for_idempotency_key(job_type: str, key: str) -> str:
    """The same Idempotency-Key for the same job type always names the same job."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{job_type}\n{key}"))


class OutputDeleted(msgspec.Struct, kw_only=True):
    """A generation's output deleted on purpose: `expired` (the sweep, OUTPUT_TTL_DAYS after the job finished) or
    `deleted` (its client asked: DELETE /v1/jobs/{id}/output). The job's outcome stands; the output is not made
    again."""

    at: str
    reason: Literal["expired", "deleted"]


class JobRecord(msgspec.Struct, kw_only=True):
    job_id: str
    type: str
    status: JobStatus
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    last_error: ErrorInfo | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None  # where the job's end is POSTed (contract/callbacks.py)
    output_deleted: OutputDeleted | None = None  # its generated output is gone: when, and why
    # the running marks of the deliveries running the job, oldest first (processor/tracking.py); a record written
    # before they were listed reads as listing none
    marks: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep deleted: expired records, and outputs past OUTPUT_TTL_DAYS (their records kept)."""

    records: int
    outputs: int


def generated_output(record: JobRecord) -> str | None:
    """The key of the output a succeeded generation stored (under GENERATED_PREFIXES); None for any other job."""
    key = (record.result or {}).get("key") if record.status == "succeeded" else None
    return key if isinstance(key, str) and key.startswith(GENERATED_PREFIXES) else None


def output_expires_at(record: JobRecord, output_ttl_days: float | None) -> str | None:
    """When a succeeded generation's output comes due for deletion (OUTPUT_TTL_DAYS after the job finished; the
    sweep deletes it within the hour after); None when outputs are kept, or it has no output left."""
    if output_ttl_days is None or generated_output(record) is None or record.output_deleted is not None:
        return None
    if record.finished_at is None:
        return None
    try:
        return iso_stamp(parse_stamp(record.finished_at) + timedelta(days=output_ttl_days))
    except ValueError:
        return None


def record_key(job_id: str) -> str:
    return f"{JOBS_PREFIX}{job_id}.json"


def _stopped(record: JobRecord, error: ErrorInfo) -> JobRecord:
    """The record of a job stopped before it ran: failed now, with `error`."""
    stamp = now_iso()
    return msgspec.structs.replace(record, status="failed", updated_at=stamp, finished_at=stamp, error=error)


def _failed_with(record: JobRecord, code: str) -> bool:
    return record.status == "failed" and record.error is not None and record.error.code == code


def withdrawn(record: JobRecord, reason: str) -> JobRecord:
    """The record of a job the API withdrew (see WITHDRAWN): failed, saying why and that it does not run."""
    message = f"the job was withdrawn before it was accepted and does not run: {reason}"
    return _stopped(record, ErrorInfo(code=WITHDRAWN, message=message))


def is_withdrawn(record: JobRecord) -> bool:
    return _failed_with(record, WITHDRAWN)


def cancellation(job_id: str) -> ErrorInfo:
    """The error of a job its client cancelled (see CANCELLED), in its record and in the reply to its requester."""
    return ErrorInfo(code=CANCELLED, message=f"job {job_id} was cancelled while queued and does not run")


def cancelled(record: JobRecord) -> JobRecord:
    """The record of a queued job its client cancelled: failed, saying so."""
    return _stopped(record, cancellation(record.job_id))


def is_cancelled(record: JobRecord) -> bool:
    return _failed_with(record, CANCELLED)


def called_off(record: JobRecord) -> bool:
    """Withdrawn by the API or cancelled by its client: the job was stopped before it ran and never makes anything."""
    return is_withdrawn(record) or is_cancelled(record)


def never_started(record: JobRecord) -> bool:
    """Queued and not yet taken by any processor (a retried job is queued again with its attempts counted)."""
    return record.status == "queued" and record.attempts == 0


def restamped(record: JobRecord) -> JobRecord:
    """The record of a job whose message is being sent again: the same, stamped now."""
    return msgspec.structs.replace(record, updated_at=now_iso())


class JobStore:
    def __init__(self, store: ObjectStore, ttl_days: int) -> None:
        self._store = store
        self._ttl = timedelta(days=ttl_days)

    def expired(self, record: JobRecord, now: datetime | None = None) -> bool:
        """Whether a finished record is past its time to live (one whose finish cannot be read counts as past it,
        as a record that cannot be read counts as absent)."""
        if record.status not in FINISHED or record.finished_at is None:
            return False
        return _older(record.finished_at, now or datetime.now(tz=UTC), self._ttl)

    async def load(self, job_id: str) -> tuple[JobRecord, str] | None:
        """The record and its version (ETag), or None when there is none (or it expired, or cannot be read)."""
        try:
            stored = await self._store.get(record_key(job_id))
        except ObjectNotFoundError:
            return None
        record = _readable(stored.data, job_id)
        return None if record is None or self.expired(record) else (record, stored.etag)

    async def get(self, job_id: str) -> JobRecord | None:
        found = await self.load(job_id)
        return found[0] if found is not None else None

    async def create(self, record: JobRecord, *, durable: bool = True, background: bool = False) -> str:
        """Write a new record; PreconditionFailedError if a readable one exists (one that cannot be read, such as
        the empty file a power failure can leave of a write that was not durable, and an expired one, which reads
        as absent until the sweep deletes it, are replaced, conditionally on their version). Returns its
        version. durable=False for a record the processor can make again (a queued or running one): a local
        store then skips the flush to disk. background: see ObjectStore.put."""
        key, data = record_key(record.job_id), msgspec.json.encode(record)
        written = functools.partial(
            self._store.put, key, data, "application/json", durable=durable, background=background
        )
        try:
            return await written(if_none_match=True)
        except PreconditionFailedError:
            try:
                existing = await self._store.get(key)
            except ObjectNotFoundError:  # deleted since: a create may now succeed
                return await written(if_none_match=True)
            found = _readable(existing.data, record.job_id)
            if found is not None and not self.expired(found):
                raise
            return await written(if_match=existing.etag)

    async def update(self, record: JobRecord, etag: str, *, durable: bool = True, background: bool = False) -> str:
        """Replace the record if it is still at version `etag`; PreconditionFailedError otherwise."""
        data = msgspec.json.encode(record)
        return await self._store.put(
            record_key(record.job_id), data, "application/json", if_match=etag, durable=durable, background=background
        )

    async def flush(self, job_id: str) -> None:
        """Make the record's last write durable (one written with durable=False: see ObjectStore.flush)."""
        await self._store.flush(record_key(job_id))

    async def delete(self, job_id: str, *, if_match: str | None = None) -> None:
        """Delete the record (only if still at version `if_match`, when given: else PreconditionFailedError)."""
        await self._store.delete(record_key(job_id), if_match=if_match)

    async def stored(self, written_before: datetime | None = None) -> AsyncIterator[tuple[str, JobRecord, str]]:
        """Every readable record in the store with its key and version, expired ones included: one read per record,
        up to READ_AHEAD at once (on R2 each is a GET). With `written_before`, only the records the listing says
        were last written before then (the others are not read)."""
        keys: list[str] = []
        async for info in self._store.list(JOBS_PREFIX):
            if written_before is not None and info.modified >= written_before:
                continue
            keys.append(info.key)
            if len(keys) == READ_AHEAD:
                for found in await self._read_many(keys):
                    yield found
                keys = []
        for found in await self._read_many(keys):
            yield found

    async def _read_many(self, keys: list[str]) -> list[tuple[str, JobRecord, str]]:
        async def read(key: str) -> tuple[str, JobRecord, str] | None:
            try:
                stored = await self._store.get(key)
            except ObjectNotFoundError:  # deleted since it was listed
                return None
            record = _readable(stored.data, key.removeprefix(JOBS_PREFIX).removesuffix(".json"))
            return None if record is None else (key, record, stored.etag)

        return [found for found in await asyncio.gather(*(read(key) for key in keys)) if found is not None]

    async def sweep(self, output_ttl_days: float | None = None) -> Swept:
        """Delete the expired records, and the states of callbacks last tried longer ago than records are kept
        (contract/callback_states.py). With `output_ttl_days` (OUTPUT_TTL_DAYS), also delete the output of each
        generation finished longer ago than that (`delete_output`), and an expired record's output with it.

        Only what was last written long enough ago to be due is read, as the listing says (SWEEP_LEEWAY allowing
        for the store's clock): a record is last written when its job finishes, so at steady state a sweep reads
        the few records that came due since the last one, not every record kept. A record written again after its
        job finished (its output's deletion marked) is read once that write is as old.

        An expired record's output is deleted first, then the record, only at the version read: a failed delete
        leaves the record for the next sweep, and a create replacing it meanwhile (its Idempotency-Key used again)
        keeps the new record. The output shares its key with the new job's (the job id comes from the Idempotency-Key),
        so it is deleted only once the record is read again still at that version, just before: a new record found
        then (the API deleted the earlier output itself when it created it) keeps the new job's output too. Records
        are read in pages, long before some are swept; what is left is the one round trip between that read and the
        delete, in which a whole new job would have to run. A callback state is deleted only at the version read,
        too: a try of the callback that writes a fresh state meanwhile keeps it."""
        now = datetime.now(tz=UTC)
        due = self._ttl if output_ttl_days is None else min(self._ttl, timedelta(days=output_ttl_days))
        records = outputs = 0
        async for key, record, version in self.stored(written_before=now - due + SWEEP_LEEWAY):
            # an output deleted on purpose is deleted again with its record: its first delete may have failed
            deleting = output_ttl_days is not None or record.output_deleted is not None
            output = generated_output(record) if deleting else None
            if self.expired(record, now):
                if output is not None:
                    if not await self._still_at(key, version):  # replaced since it was read: see above
                        continue
                    await self._store.delete(output)
                try:
                    await self._store.delete(key, if_match=version)
                except PreconditionFailedError:  # replaced meanwhile (create): the new record stays
                    continue
                records += 1
            elif (
                output is not None
                and output_ttl_days is not None
                and record.output_deleted is None
                and record.finished_at is not None
                and _older(record.finished_at, now, timedelta(days=output_ttl_days))
            ):
                try:
                    await self.delete_output(record, version, "expired")
                except PreconditionFailedError:  # written meanwhile: the next sweep looks at it again
                    continue
                outputs += 1
        async for key, state, version in stored_states(self._store, written_before=now - self._ttl + SWEEP_LEEWAY):
            if state is None or _older(state.at, now, self._ttl):
                with contextlib.suppress(PreconditionFailedError):  # a try wrote a fresh one since: it stays
                    await self._store.delete(key, if_match=version)
        return Swept(records=records, outputs=outputs)

    async def _still_at(self, key: str, version: str) -> bool:
        try:
            return (await self._store.get(key)).etag == version
        except ObjectNotFoundError:  # deleted meanwhile (another sweep): whoever did so took its output
            return False

    async def delete_output(self, record: JobRecord, version: str, reason: Literal["expired", "deleted"]) -> JobRecord:
        """Delete a succeeded generation's output (generated_output), saying so in its record first (conditionally
        on `version`: PreconditionFailedError when it changed meanwhile), so a reader never finds the record
        naming an output that is gone without saying why. A record that says so already is left as it is, and its
        output deleted again (the delete that followed its mark may have failed). Returns the record."""
        output = generated_output(record)
        if output is None:
            raise ValueError(f"job {record.job_id} has no generated output to delete")
        marked = record
        if record.output_deleted is None:
            marked = msgspec.structs.replace(record, output_deleted=OutputDeleted(at=now_iso(), reason=reason))
            await self.update(marked, version)
            metrics.output_deleted(reason)
        await self._store.delete(output)
        return marked

    @staticmethod
    def new(
        job_id: str,
        job_type: str,
        params: dict[str, Any],
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> JobRecord:
        stamp = now_iso()
        return JobRecord(
            job_id=job_id,
            type=job_type,
            status="queued",
            created_at=stamp,
            updated_at=stamp,
            params=params,
            idempotency_key=idempotency_key,
            callback_url=callback_url,
        )


class NoOutputError(Exception):
    """The job has no generated output to delete, `code` saying why: `job_not_finished` (not yet; or its record kept
    changing meanwhile) or `no_output` (it failed, or is no generation)."""

    def __init__(self, job_id: str, why: str, code: Literal["job_not_finished", "no_output"]) -> None:
        super().__init__(f"job {job_id} has no output to delete: {why}")
        self.code = code


@dataclass(frozen=True, slots=True)
class OutputDeletion:
    record: JobRecord
    already: bool  # its output was deleted before (or expired): the record was left as it was


async def delete_job_output(jobs: JobStore, job_id: str) -> OutputDeletion | None:
    """Delete a succeeded generation's output now, its record saying so (JobStore.delete_output, reason `deleted`);
    None when there is no such job. One deleted already (or expired) keeps its record as it is, and its output is
    deleted again; NoOutputError for a job that is not finished, failed, or made no generated output."""
    for _ in range(_CANCEL_ROUNDS):
        found = await jobs.load(job_id)
        if found is None:
            return None
        record, version = found
        if record.status not in FINISHED:
            raise NoOutputError(job_id, f"it is {record.status}; wait until it has finished", "job_not_finished")
        if record.status == "failed":
            raise NoOutputError(job_id, "it failed", "no_output")
        if generated_output(record) is None:
            raise NoOutputError(job_id, f"a {record.type} job makes no generated image or voice", "no_output")
        try:
            deleted = await jobs.delete_output(record, version, "deleted")
        except PreconditionFailedError:
            continue
        log.info("job_output_deleted", job_id=job_id, job_type=record.type)
        return OutputDeletion(deleted, already=record.output_deleted is not None)
    raise NoOutputError(job_id, "its record kept changing meanwhile; try again", "job_not_finished")


class NotCancellableError(Exception):
    """The job is past cancelling: it is running or finished (`status`), or its record kept changing."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"job {job_id} cannot be cancelled ({why}); only a queued job can")


@dataclass(frozen=True, slots=True)
class Cancellation:
    record: JobRecord
    already: bool  # cancelled before: nothing was written


async def cancel_queued(jobs: JobStore, job_id: str) -> Cancellation | None:
    """Cancel a queued job (see CANCELLED); None when there is no such job. The write is conditional on the version
    read, as a processor's running mark is: a write made meanwhile means reading the record again. A job cancelled
    already is answered as it is; NotCancellableError for one running or finished."""
    for _ in range(_CANCEL_ROUNDS):
        found = await jobs.load(job_id)
        if found is None:
            return None
        record, version = found
        if is_cancelled(record):
            return Cancellation(record, already=True)
        if record.status != "queued":
            raise NotCancellableError(job_id, f"it is {record.status}")
        stopped = cancelled(record)
        try:
            await jobs.update(stopped, version)
        except PreconditionFailedError:
            continue
        log.info("job_cancelled", job_id=job_id, job_type=record.type)
        return Cancellation(stopped, already=False)
    raise NotCancellableError(job_id, "its record kept changing while it was being cancelled; try again")


def record_headers(record: JobRecord, etag: str) -> dict[str, object]:
    """The headers of a job message whose record the API just wrote (`record`, at version `etag`)."""
    return {
        RECORD_HEADER: True,
        QUEUED_RECORD_HEADER: msgspec.json.encode(record).decode(),
        QUEUED_VERSION_HEADER: etag,
    }


def queued_record(headers: Mapping[str, Any]) -> tuple[JobRecord, str] | None:
    """The queued record and its version that a message carries; None when it carries none it can be read from.
    Only a first delivery may trust it: by a redelivery or a retry the record may have moved on (a stale one is
    still safe, since every record write is conditional, only slower)."""
    text, etag = headers.get(QUEUED_RECORD_HEADER), headers.get(QUEUED_VERSION_HEADER)
    if not isinstance(text, str) or not isinstance(etag, str) or not etag:
        return None
    try:
        return msgspec.json.decode(text, type=JobRecord), etag
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def _readable(data: bytes, job_id: str) -> JobRecord | None:
    try:
        return msgspec.json.decode(data, type=JobRecord)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as exc:
        log.warning("job_record_unreadable", job_id=job_id, size=len(data), error=str(exc))
        return None


def record_params(payload: msgspec.Struct) -> dict[str, object]:
    """The job's parameters as recorded: binary fields (inline images, audio) are left out."""
    fields = msgspec.structs.asdict(payload)
    return {name: value for name, value in fields.items() if not isinstance(value, bytes) and value is not None}
