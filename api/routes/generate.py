"""Image generation, the seed's two endpoints: PNG bytes, or the key of the PNG stored in R2."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.status_codes import HTTP_200_OK

from api.auth import WRITE
from api.errors import ApiError
from api.features import needs
from api.jobs import JobStart, accepted, allowed_callback_url, finished_result, output_bytes, start_job
from api.openapi import ACCEPTED, binary, errors
from api.parameters import CALLBACK_URL, IDEMPOTENCY_KEY
from api.schemas import GeneratedImageKey, GenerateImageRequest, JobAccepted
from api.services import Services
from api.strict import strict_json
from contract.messages import IMAGE_GENERATE, ContractError, ImageGenerateV1, check_generation_budget


def generation_payload(services: Services, request: GenerateImageRequest) -> ImageGenerateV1:
    """The image.generate message for a request, if its cost is within the server's budget (else 422)."""
    payload = ImageGenerateV1(**msgspec.structs.asdict(request))
    try:
        check_generation_budget(payload, services.settings)
    except ContractError as exc:
        raise ApiError(422, exc.code, exc.message) from None
    return payload


async def _generate(
    request: Request, services: Services, idempotency_key: str | None, callback_url: str | None
) -> tuple[JobStart, dict[str, Any] | None]:
    """Start (or find) the generation the request's JSON body asks for and wait for it: the job, and its result
    once finished (None past SYNC_TIMEOUT_SECONDS)."""
    callback = allowed_callback_url(services, callback_url)
    data = await strict_json(request, GenerateImageRequest)
    started = await start_job(
        services,
        job_type=IMAGE_GENERATE,
        payload=generation_payload(services, data),
        wait=True,
        idempotency_key=idempotency_key,
        callback_url=callback,
        request=request,
    )
    return started, await finished_result(started)


@post(
    "/v1/images/generate",
    status_code=HTTP_200_OK,
    summary="Generate an image; answers with the PNG bytes (or 202 and a job id past SYNC_TIMEOUT_SECONDS)",
    opt={**WRITE, **needs("image")},
    responses={
        HTTP_200_OK: binary("image/png", "The PNG; X-Seed says the seed used, X-Job-Id the job"),
        **ACCEPTED,
        **errors(408, 409, 410, 413, 422, 503),
    },
)
async def generate_image(
    request: Request,
    services: Services,
    data: GenerateImageRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
    callback_url: Annotated[str | None, CALLBACK_URL] = None,
) -> Response[bytes | JobAccepted]:
    started, result = await _generate(request, services, idempotency_key, callback_url)
    if result is None:
        return accepted(request, services, started.record)
    return Response(
        await output_bytes(services, started, result),
        media_type="image/png",
        headers={"X-Job-Id": started.record.job_id, "X-Seed": str(result["seed"])},
    )


@post(
    "/v1/r2/images/generate",
    status_code=HTTP_200_OK,
    summary="Generate an image into R2; answers with its key (or 202 and a job id past SYNC_TIMEOUT_SECONDS)",
    opt={**WRITE, **needs("image", "r2", instead="POST /v1/images/generate")},
    responses={**ACCEPTED, **errors(408, 409, 410, 413, 422, 503)},
)
async def generate_image_to_r2(
    request: Request,
    services: Services,
    data: GenerateImageRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
    callback_url: Annotated[str | None, CALLBACK_URL] = None,
) -> Response[GeneratedImageKey | JobAccepted]:
    started, result = await _generate(request, services, idempotency_key, callback_url)
    if result is None:
        return accepted(request, services, started.record)
    return Response(GeneratedImageKey(key=result["key"], job_id=started.record.job_id, seed=result["seed"]))


ROUTES = [generate_image, generate_image_to_r2]
