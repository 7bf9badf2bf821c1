"""`ams-ops backfill`: index the images already in the bucket, or make the missing thumbnails of indexed ones."""

from __future__ import annotations

import json

import click

from infra.storage.base import InvalidKeyError
from infra.storage.keys import validate_prefix
from processor.ops.backfill import plan_backfill, run_backfill
from processor.ops.cli.common import EXIT_CODES, echo, progress, read_settings, run
from processor.ops.thumbnails import ThumbnailReport, run_thumbnail_backfill


def _prefix(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_prefix(value)
    except InvalidKeyError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(epilog=EXIT_CODES)
@click.option("--prefix", metavar="PREFIX", callback=_prefix, help="Key prefix to index, e.g. images/incoming/.")
@click.option(
    "--thumbnails",
    is_flag=True,
    help="Instead of --prefix: make the missing thumbnails of the images already in the index, through the API.",
)
@click.option("--dry-run", is_flag=True, help="With --prefix: count what would be published and publish nothing.")
@click.option(
    "--api-url",
    metavar="URL",
    envvar="AMS_API_URL",
    default="http://localhost:8000",
    show_default=True,
    help="The running API: asked which images are already indexed, or for their thumbnails [env AMS_API_URL].",
)
@click.option(
    "--api-key",
    metavar="KEY",
    envvar="AMS_API_KEY",
    default="",
    help="A read key, when the API requires keys (API_KEYS) [env AMS_API_KEY].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    metavar="N",
    help="Parallel requests to the API.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as a JSON object.")
def backfill(
    prefix: str | None, thumbnails: bool, dry_run: bool, api_url: str, api_key: str, concurrency: int, as_json: bool
) -> None:
    """Index the images already in the bucket under PREFIX, or (--thumbnails) make the missing thumbnails of
    the images already in the index.

    With --prefix: publishes one image.index job (message id = the image id derived from bucket and key) for
    each key with an image extension (.jpg .jpeg .png .webp .gif .bmp .tif .tiff) that the API does not know
    yet, so it can be re-run after an interruption. The server's own objects (images/originals/,
    images/thumbs/) are left out.

    With --thumbnails: walks the API's listing and asks for each image's thumbnail, which the API makes from
    the original when it is missing (images indexed before thumbnails existed). Images whose original is gone
    or unreadable are counted as skipped, with the API's error code.
    """
    if thumbnails:
        if prefix is not None or dry_run:
            raise click.UsageError("--thumbnails works on the whole index: give it without --prefix and --dry-run")
        _backfill_thumbnails(api_url, api_key, concurrency, as_json)
        return
    if prefix is None:
        raise click.UsageError("say what to backfill: --prefix PREFIX (index the images under it) or --thumbnails")
    settings = read_settings()

    async def work() -> None:
        plan = await plan_backfill(settings, prefix)
        with progress(len(plan.images), "indexing", visible=not (dry_run or as_json)) as advance:
            report = await run_backfill(
                plan,
                settings=settings,
                api_url=api_url,
                api_key=api_key,
                dry_run=dry_run,
                concurrency=concurrency,
                advance=advance,
            )
        if as_json:
            echo(json.dumps(report.summary()))
            return
        verb = "would publish" if dry_run else "published"
        own = f", skipped (this server's own) {report.skipped_own}" if report.skipped_own else ""
        refused = report.skipped_not_indexable
        unindexable = f", skipped (a key not indexed or over IMAGE_SEARCH_MAX_BYTES) {refused}" if refused else ""
        echo(
            f"{verb} {report.published}, already indexed {report.already_indexed}, "
            f"skipped (not images) {report.skipped_not_image}{own}{unindexable}"
        )

    run(work())


def _backfill_thumbnails(api_url: str, api_key: str, concurrency: int, as_json: bool) -> None:
    report: ThumbnailReport = run(run_thumbnail_backfill(api_url=api_url, api_key=api_key, concurrency=concurrency))
    if as_json:
        echo(json.dumps(report.summary()))
        return
    reasons = ", ".join(f"{code} {count}" for code, count in sorted(report.skipped.items()))
    echo(
        f"made {report.made}, already there {report.already_there}, skipped {report.skipped.total()}"
        + (f" ({reasons})" if reasons else "")
    )
