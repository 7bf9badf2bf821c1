"""`ams-ops index`: what the image index holds, backups to the object store, restores, graph builds."""

from __future__ import annotations

import json

import click
import msgspec

from processor.ops.cli.common import EXIT_CODES, echo, read_settings, run
from processor.ops.index import backup_now, build_graph, index_report, restore_backup


@click.group(epilog=EXIT_CODES)
def index() -> None:
    """The image index: what it holds, backups to the object store, restores, graph builds.

    With QDRANT_URL unset, these reach the embedded index of the running server (or, when none runs, open it
    for the duration of the command). Backups go to the configured object store under IMAGE_SEARCH_DB_R2_KEY.
    """


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@index.command(epilog=EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="A JSON object instead of the text.")
def stats(as_json: bool) -> None:
    """What the index holds: points, how many are in the search graph, disk use, last build, and backups."""
    settings = read_settings()
    report = run(index_report(settings))
    figures = report.stats
    if as_json:
        echo(
            json.dumps(
                {
                    "index": msgspec.to_builtins(figures),
                    "served_by_running_server": report.served_by_running_server,
                    "backups": None
                    if report.backups is None
                    else [{"key": b.key, "size": b.size, "taken_at": b.taken_at} for b in report.backups],
                    "backups_error": report.backups_error,
                }
            )
        )
        return
    served = "the running server's" if report.served_by_running_server else "opened by this command"
    lines = [
        f"engine           {figures.engine} ({served})",
        f"location         {figures.location}",
        f"model            {figures.model_id or '-'} ({figures.dim or '-'} dimensions)",
        f"points           {figures.points}",
        f"in search graph  {figures.indexed_points} ({figures.points - figures.indexed_points} searched exactly)",
        f"segments         {figures.segments}",
        f"disk             {_size(figures.disk_bytes)}",
        f"graph build      {'running' if figures.building else 'idle'}",
    ]
    if figures.last_build:
        lines.append(f"last build       {json.dumps(figures.last_build)}")
    if report.backups_error:
        lines.append(f"backups          unavailable: {report.backups_error}")
    elif report.backups is not None:
        lines.append(f"backups          {len(report.backups)} under {settings.image_search_db_r2_key}")
        lines += [f"  {b.key}  {_size(b.size)}  {b.taken_at or 'old format'}" for b in report.backups]
    echo("\n".join(lines))


@index.command(epilog=EXIT_CODES)
def backup() -> None:
    """Back the embedded index up to the object store now (also while the server runs), keeping the newest
    IMAGE_SEARCH_DB_BACKUP_GENERATIONS."""
    settings = read_settings()
    info = run(backup_now(settings))
    echo(f"backed up to {info.key} ({_size(info.size)})")


@index.command(epilog=EXIT_CODES)
@click.option("--key", metavar="KEY", help="The backup to restore (default: the newest; see `index stats`).")
@click.option("--force", is_flag=True, help="Replace the index that exists.")
def restore(key: str | None, force: bool) -> None:
    """Restore a backup into the embedded index. The server must be stopped; every file is checked against
    the backup's manifest before anything is replaced."""
    settings = read_settings()
    report = run(restore_backup(settings, key, replace=force))
    echo(f"restored {report.points} points from {report.key} (model {report.model_id})")


@index.command(epilog=EXIT_CODES)
@click.option("--wait", is_flag=True, help="Return when the build is done, with what it did.")
def build(wait: bool) -> None:
    """Build the search graph of the points not yet in it now (the server also does this by itself)."""
    settings = read_settings()
    result = run(build_graph(settings, wait=wait))
    if wait and result:
        echo(json.dumps(result))
    else:
        echo("graph build started" if settings.qdrant_url == "" else "a Qdrant server builds its own graph")
