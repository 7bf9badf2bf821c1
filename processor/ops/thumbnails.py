"""`ams-ops backfill --thumbnails`: thumbnails for the images indexed before the indexer made them.

Walks the API's listing (GET /v1/images, newest first, a page at a time with its cursor) and asks for each image's
thumbnail (GET /v1/images/{id}/thumbnail), which the API makes from the original when it is missing and stores
only if still absent: the walk can be re-run after any interruption, and runs beside the server's own work.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import httpx

from processor.ops.backfill import api_client, api_get, error_code, unexpected
from processor.ops.errors import OperationFailedError

PAGE_SIZE = 1000  # the listing's largest page


@dataclass(slots=True)
class ThumbnailReport:
    made: int = 0
    already_there: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # error code -> images

    @property
    def images(self) -> int:
        return self.made + self.already_there + self.skipped.total()

    def summary(self) -> dict[str, object]:
        return {
            "images": self.images,
            "made": self.made,
            "already_there": self.already_there,
            "skipped": dict(sorted(self.skipped.items())),
        }


async def run_thumbnail_backfill(*, api_url: str, api_key: str, concurrency: int) -> ThumbnailReport:
    """Ask for the thumbnail of every indexed image, `concurrency` at a time."""
    report = ThumbnailReport()
    async with api_client(api_key) as client:
        cursor: str | None = None
        while True:
            page, cursor = await _page(client, api_url, cursor)
            await _ask_each(client, api_url, page, concurrency, report)
            if cursor is None:
                return report


async def _page(client: httpx.AsyncClient, api_url: str, cursor: str | None) -> tuple[list[str], str | None]:
    params = {"limit": str(PAGE_SIZE)} | ({"cursor": cursor} if cursor else {})
    response = await api_get(client, api_url, "/v1/images", params)
    if response.status_code != 200:
        raise unexpected(response)
    return [item["id"] for item in response.json()], response.headers.get("X-Next-Cursor")


async def _ask_each(
    client: httpx.AsyncClient,
    api_url: str,
    page: list[str],
    concurrency: int,
    report: ThumbnailReport,
) -> None:
    pending = iter(page)

    async def work() -> None:
        for image_id in pending:
            await _ask(client, api_url, image_id, report)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(page))):
                group.create_task(work())
    except* OperationFailedError as failures:
        raise failures.exceptions[0] from None


async def _ask(client: httpx.AsyncClient, api_url: str, image_id: str, report: ThumbnailReport) -> None:
    response = await api_get(client, api_url, f"/v1/images/{image_id}/thumbnail")
    if response.status_code == 307:
        if response.headers.get("X-Thumbnail") == "made":
            report.made += 1
        else:
            report.already_there += 1
        return
    skipped = _skip_reason(response)
    if skipped is None:
        raise unexpected(response)
    report.skipped[skipped] += 1


def _skip_reason(response: httpx.Response) -> str | None:
    """The error code of an answer that skips one image and goes on: it was deleted meanwhile (404
    image_not_found), its original is gone (404 original_not_found) or no longer an image (422)."""
    code = error_code(response)
    if response.status_code == 404 and code in ("image_not_found", "original_not_found"):
        return code
    if response.status_code == 422 and code:
        return code
    return None
