"""Index images already in the bucket: one image.index job per image under a prefix, skipping those indexed.

The image id derives from bucket and key (contract.image_ids), so a job is idempotent and a backfill can be
re-run after any interruption: images the API already knows (GET /v1/images/{id} answers 200) are not published
again, and a duplicate job for an image still in the queue indexes it once. The server's own objects (originals
of uploads, thumbnails) are never published: they are indexed, or made, already.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

import httpx

from contract.image_ids import ORIGINALS_PREFIX, THUMBNAILS_PREFIX, image_id_for_key
from contract.messages import IMAGE_INDEX, JSON
from infra.broker import BROKER_ERRORS, BrokerUnavailableError, Priority, Publisher, connect, redact
from infra.settings import Settings
from infra.storage import InvalidKeyError, ObjectInfo, StorageError, validate_key
from infra.storage.factory import open_store
from processor.ops.errors import OperationFailedError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SOURCE = "backfill"
API_TIMEOUT_SECONDS = 30
# what the server writes itself: uploads' originals (indexed under their upload ids) and thumbnails
SERVER_PREFIXES = (ORIGINALS_PREFIX, THUMBNAILS_PREFIX)


def is_image_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS


def bucket_name(settings: Settings) -> str:
    """The bucket part of image ids: the R2 bucket, or "local" for the embedded store (as the processor does)."""
    return settings.r2_bucket_name if settings.r2_enabled else "local"


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    bucket: str
    prefix: str
    images: list[str]  # keys, in key order
    skipped_not_image: int
    skipped_own: int  # the server's own objects (SERVER_PREFIXES)
    skipped_not_indexable: int  # keys the server does not index, objects over IMAGE_SEARCH_MAX_BYTES


@dataclass(frozen=True, slots=True)
class BackfillReport:
    published: int
    already_indexed: int
    skipped_not_image: int
    skipped_own: int
    skipped_not_indexable: int
    dry_run: bool

    def summary(self) -> dict[str, int | bool]:
        return {
            "published": self.published,
            "already_indexed": self.already_indexed,
            "skipped_not_image": self.skipped_not_image,
            "skipped_own": self.skipped_own,
            "skipped_not_indexable": self.skipped_not_indexable,
            "dry_run": self.dry_run,
        }


async def plan_backfill(settings: Settings, prefix: str) -> BackfillPlan:
    """List the bucket under prefix and keep the keys that name images, except the server's own and those the
    processor would refuse (a key it does not index, an object over IMAGE_SEARCH_MAX_BYTES)."""
    bucket = bucket_name(settings)
    where = f"{bucket}/{prefix}" if settings.r2_enabled else f"{settings.local_storage_dir}/{prefix}"
    try:
        store = await open_store(settings)
        try:
            listed = [info async for info in store.list(prefix)]
        finally:
            await store.close()
    except StorageError as exc:
        raise OperationFailedError(f"cannot list {where}: {exc}") from None
    theirs = [info for info in listed if not info.key.startswith(SERVER_PREFIXES)]
    images = [info for info in theirs if is_image_key(info.key)]
    indexable = [info.key for info in images if _indexable(info, settings.image_search_max_bytes)]
    return BackfillPlan(
        bucket=bucket,
        prefix=prefix,
        images=indexable,
        skipped_not_image=len(theirs) - len(images),
        skipped_own=len(listed) - len(theirs),
        skipped_not_indexable=len(images) - len(indexable),
    )


def _indexable(info: ObjectInfo, max_bytes: int) -> bool:
    try:
        validate_key(info.key)
    except InvalidKeyError:
        return False
    return info.size <= max_bytes


async def run_backfill(
    plan: BackfillPlan,
    *,
    settings: Settings,
    api_url: str,
    dry_run: bool,
    concurrency: int,
    advance: Callable[[int], object],
    api_key: str = "",
) -> BackfillReport:
    """Check each image against the API and publish a job for those not indexed (none with dry_run).
    `advance(1)` is called once per image handled."""
    published = already_indexed = 0
    pending = iter(plan.images)

    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(api_client(api_key))
        publisher = None
        if not dry_run and plan.images:
            publisher = await stack.enter_async_context(_publisher(settings))

        async def work() -> None:
            nonlocal published, already_indexed
            for key in pending:
                image_id = image_id_for_key(plan.bucket, key)
                if await _is_indexed(client, api_url, image_id):
                    already_indexed += 1
                else:
                    if publisher is not None:
                        await _publish(publisher, key, image_id)
                    published += 1
                advance(1)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(plan.images))):
                    group.create_task(work())
        except* OperationFailedError as failures:
            raise failures.exceptions[0] from None
    return BackfillReport(
        published, already_indexed, plan.skipped_not_image, plan.skipped_own, plan.skipped_not_indexable, dry_run
    )


def api_client(api_key: str) -> httpx.AsyncClient:
    """A client of the API, with the key when one is given (redirects are not followed)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(timeout=API_TIMEOUT_SECONDS, headers=headers)


async def api_get(
    client: httpx.AsyncClient, api_url: str, path: str, params: dict[str, str] | None = None
) -> httpx.Response:
    """GET a path of the API; OperationFailedError, in one line, when the API cannot be reached."""
    try:
        return await client.get(f"{api_url.rstrip('/')}{path}", params=params)
    except httpx.HTTPError as exc:
        raise OperationFailedError(
            f"cannot reach the API at {api_url} (--api-url / AMS_API_URL): {str(exc) or type(exc).__name__}"
        ) from None


def unexpected(response: httpx.Response) -> OperationFailedError:
    return OperationFailedError(
        f"GET {response.request.url} answered {response.status_code}: {response.text[:300].strip()}"
    )


async def _is_indexed(client: httpx.AsyncClient, api_url: str, image_id: str) -> bool:
    response = await api_get(client, api_url, f"/v1/images/{image_id}")
    if response.status_code == 200:
        return True
    if response.status_code == 404 and error_code(response) == "image_not_found":
        return False
    raise unexpected(response)


def error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return None
    return body.get("code") if isinstance(body, dict) else None


@asynccontextmanager
async def _publisher(settings: Settings) -> AsyncIterator[Publisher]:
    try:
        connection = await connect(settings.amqp_url, settings.amqp_connect_timeout_seconds)
    except BrokerUnavailableError as exc:
        raise OperationFailedError(str(exc)) from None
    try:
        try:
            publisher = await Publisher.open(connection)
        except BROKER_ERRORS as exc:
            raise OperationFailedError(
                f"RabbitMQ at {redact(settings.amqp_url)} (AMQP_URL) refused the topology: {exc}"
            ) from None
        yield publisher
    finally:
        await connection.close()


async def _publish(publisher: Publisher, key: str, image_id: str) -> None:
    try:
        await publisher.publish(
            message_type=IMAGE_INDEX,
            body=json.dumps({"key": key, "source": SOURCE}).encode(),
            message_id=image_id,
            content_type=JSON,
            priority=Priority.BULK,
        )
    except BrokerUnavailableError as exc:
        raise OperationFailedError(str(exc)) from None
