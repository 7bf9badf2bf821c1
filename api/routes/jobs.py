"""The async job API: start any job type, read any job's status, cancel a queued job."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import ValidationException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from api.auth import READ, WRITE
from api.errors import ApiError, error_response, validation_error
from api.features import require_feature
from api.jobs import (
    MAX_WAIT_SECONDS,
    accepted,
    allowed_callback_url,
    cancel_job,
    delete_output,
    finished,
    job_store,
    next_state,
    start_job,
)
from api.openapi import errors
from api.parameters import IDEMPOTENCY_KEY
from api.routes.generate import generation_payload
from api.routes.images import to_image_out
from api.routes.voice import reference_payload
from api.schemas import (
    CallbackOut,
    ImageJobRequest,
    JobAccepted,
    JobError,
    JobKind,
    JobOut,
    JobRequest,
    VoiceJobRequest,
)
from api.services import Services
from api.strict import json_document, strict_convert
from api.urls import absolute, job_url
from contract.callback_states import read_state
from contract.events import has_ended, job_finished
from contract.jobs import JobRecord, JobStatus, is_withdrawn, output_expires_at
from contract.messages import IMAGE_GENERATE, IMAGE_INDEX, VOICE_GENERATE, ImageGenerateV1, VoiceGenerateV1
from infra.vectors import ImageRecord


async def _image_job(services: Services, request: ImageJobRequest) -> ImageGenerateV1:
    require_feature(services.settings, "image")
    return generation_payload(services, request.params)


async def _voice_job(services: Services, request: VoiceJobRequest) -> VoiceGenerateV1:
    require_feature(services.settings, "voice")
    return await reference_payload(services, request.params)


# job types this endpoint starts: type -> check the request and build the message payload
_JOB_TYPES: dict[str, Callable[[Services, Any], Awaitable[msgspec.Struct]]] = {
    IMAGE_GENERATE: _image_job,
    VOICE_GENERATE: _voice_job,
}


def _unknown_job_type(request: Request, exc: ValidationException) -> Response[Any]:
    """Litestar checks the body against the job types first: an unknown `type` is named, with the known ones."""
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("key") == "type" and "Invalid value" in str(item.get("message")):
            known = ", ".join(sorted(_JOB_TYPES))
            given = item.get("message")
            return error_response(400, "unknown_job_type", f"unknown job type ({given}); known types: {known}")
    return validation_error(request, exc)


@post(
    "/v1/jobs",
    status_code=HTTP_202_ACCEPTED,
    summary="Start a job; poll its status_url",
    opt=WRITE,
    responses=errors(404, 408, 409, 413, 422, 503),
    exception_handlers={ValidationException: _unknown_job_type},
)
async def create_job(
    request: Request,
    services: Services,
    data: JobRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> Response[JobAccepted]:
    document = await json_document(request)
    kind = strict_convert(document, JobKind)
    prepare = _JOB_TYPES.get(kind.type)
    if prepare is None:
        raise ApiError(
            400, "unknown_job_type", f"unknown job type {kind.type!r}; known types: {', '.join(sorted(_JOB_TYPES))}"
        )
    job = strict_convert(document, JobRequest)
    callback_url = allowed_callback_url(services, job.callback_url)
    payload = await prepare(services, job)
    started = await start_job(
        services,
        job_type=kind.type,
        payload=payload,
        wait=False,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
    )
    return accepted(request, services, started.record)


async def _callback_of(services: Services, record: JobRecord) -> CallbackOut | None:
    """What became of the callback of the job's end (None: the job has no callback_url, or was withdrawn and so has
    no end to announce); pending until the end's first try is recorded. A state written for an earlier end of the
    job (before an operator's replay) is not this end's."""
    if record.callback_url is None or is_withdrawn(record):
        return None
    state = await read_state(services.store, record.job_id) if has_ended(record) else None
    if state is None or state.event_id != job_finished(record)[1].event_id:
        return CallbackOut(state="pending", attempts=0)
    return CallbackOut(state=state.state, attempts=state.attempts, answer=state.answer, at=state.at)


def to_job_out(
    request: Request,
    services: Services,
    record: JobRecord,
    result: dict[str, Any] | None,
    callback: CallbackOut | None,
) -> JobOut:
    return JobOut(
        job_id=record.job_id,
        type=record.type,
        status=record.status,
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempts=record.attempts,
        params=record.params,
        result=result,
        error=JobError(code=record.error.code, message=record.error.message) if record.error else None,
        last_error=(
            JobError(code=record.last_error.code, message=record.last_error.message) if record.last_error else None
        ),
        callback_url=record.callback_url,
        callback=callback,
        output_deleted=record.output_deleted,
        output_expires_at=output_expires_at(record, services.settings.output_ttl_days),
        status_url=job_url(request, services.settings, record.job_id),
    )


@get(
    "/v1/jobs/{job_id:str}",
    summary="A job's status, timestamps and result or error",
    opt=READ,
    responses=errors(404, 503),
)
async def get_job(
    request: Request,
    services: Services,
    job_id: str,
    wait_seconds: Annotated[
        float,
        Parameter(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description=(
                "long poll: answer as soon as the job's status changes or it is finished, or after this many seconds"
                " with the job as it is (0: at once)"
            ),
        ),
    ] = 0,
    while_status: Annotated[
        JobStatus | None,
        Parameter(
            description=(
                "with wait_seconds: wait while the job's status is this one (the one the client last saw), instead of"
                " the one it has when the request arrives"
            )
        ),
    ] = None,
) -> JobOut:
    job_id = _job_id(job_id)
    record = await job_store(services).get(job_id)
    if record is not None and wait_seconds > 0 and not finished(record) and while_status in (None, record.status):
        record = await next_state(request, services, record, wait_seconds)
    if record is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    return to_job_out(
        request, services, record, await _result_of(request, services, record), await _callback_of(services, record)
    )


async def _result_of(request: Request, services: Services, record: JobRecord) -> dict[str, Any] | None:
    """The job's result as shown: an upload's (image.index) as `GET /v1/images/{id}` shows the image; another's
    with a download `url` of the output it names, unless that was deleted."""
    if record.type == IMAGE_INDEX and record.result is not None:
        try:
            image = msgspec.convert(record.result, ImageRecord)
        except msgspec.ValidationError:  # not a record of an image (never written so): shown as it is
            return dict(record.result)
        return msgspec.to_builtins(to_image_out(request, services, image))
    result = dict(record.result) if record.result is not None else None
    if result is not None and isinstance(result.get("key"), str) and record.output_deleted is None:
        url = await services.store.presigned_get_url(result["key"], services.settings.presign_ttl_seconds)
        result["url"] = absolute(request, services.settings, url)
    return result


@post(
    "/v1/jobs/{job_id:str}/cancel",
    status_code=HTTP_200_OK,
    summary="Cancel a queued job: it never runs; answers with the job, now failed with code cancelled",
    opt=WRITE,
    responses=errors(404, 409, 503),
)
async def cancel(request: Request, services: Services, job_id: str) -> JobOut:
    record = await cancel_job(services, _job_id(job_id))
    return to_job_out(request, services, record, None, await _callback_of(services, record))


@delete(
    "/v1/jobs/{job_id:str}/output",
    status_code=HTTP_200_OK,
    summary="Delete a finished generation's image or voice now; answers with the job, its output_deleted saying so",
    opt=WRITE,
    responses=errors(404, 409, 503),
)
async def delete_job_output(request: Request, services: Services, job_id: str) -> JobOut:
    """The job stays (and its Idempotency-Key answers 410 output_deleted); the output is not made again."""
    record = await delete_output(services, _job_id(job_id))
    return to_job_out(
        request, services, record, await _result_of(request, services, record), await _callback_of(services, record)
    )


def _job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r} (ids are UUIDs)") from None


ROUTES = [create_job, get_job, cancel, delete_job_output]
