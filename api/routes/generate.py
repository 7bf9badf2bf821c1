"""Image generation, the seed's two endpoints: PNG bytes, or the key of the PNG stored in R2."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Request, Response, post
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from api.auth import WRITE
from api.errors import ApiError
from api.jobs import accepted, finished_result, output_bytes, require_r2, start_job
from api.schemas import GeneratedImageKey, GenerateImageRequest, JobAccepted
from api.services import Services
from api.strict import strict_json
from contract.messages import IMAGE_GENERATE, ContractError, ImageGenerateV1, check_generation_budget

IDEMPOTENCY_KEY = Parameter(
    header="Idempotency-Key",
    required=False,
    description="a retried request with the same key returns the same job instead of starting another",
)


def require_generation(services: Services) -> None:
    if not services.settings.image_enabled:
        raise ApiError(503, "feature_disabled", "image generation is disabled on this server (IMAGE_ENABLED=0)")


def generation_payload(services: Services, request: GenerateImageRequest) -> ImageGenerateV1:
    """The image.generate message for a request, if its cost is within the server's budget (else 422)."""
    payload = ImageGenerateV1(**msgspec.structs.asdict(request))
    try:
        check_generation_budget(payload, services.settings)
    except ContractError as exc:
        raise ApiError(422, exc.code, exc.message) from None
    return payload


@post(
    "/v1/images/generate",
    status_code=HTTP_200_OK,
    summary="Generate an image; answers with the PNG bytes (or 202 and a job id past SYNC_TIMEOUT_SECONDS)",
    opt=WRITE,
)
async def generate_image(
    request: Request,
    services: Services,
    data: GenerateImageRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> Response[bytes | JobAccepted]:
    require_generation(services)
    data = await strict_json(request, GenerateImageRequest)
    started = await start_job(
        services,
        job_type=IMAGE_GENERATE,
        payload=generation_payload(services, data),
        wait=True,
        idempotency_key=idempotency_key,
    )
    result = await finished_result(started)
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
    opt=WRITE,
)
async def generate_image_to_r2(
    request: Request,
    services: Services,
    data: GenerateImageRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> Response[GeneratedImageKey | JobAccepted]:
    require_generation(services)
    data = await strict_json(request, GenerateImageRequest)
    require_r2(services, "POST /v1/images/generate")
    started = await start_job(
        services,
        job_type=IMAGE_GENERATE,
        payload=generation_payload(services, data),
        wait=True,
        idempotency_key=idempotency_key,
    )
    result = await finished_result(started)
    if result is None:
        return accepted(request, services, started.record)
    return Response(GeneratedImageKey(key=result["key"], job_id=started.record.job_id, seed=result["seed"]))


ROUTES = [generate_image, generate_image_to_r2]
