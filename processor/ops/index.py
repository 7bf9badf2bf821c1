"""The image index on demand: stats, backup, restore, graph build.

Reaches the index the way the server does: a Qdrant server when QDRANT_URL is set; otherwise the embedded
engine of the running server (over its Unix socket, so this works while the server runs), or, when no server
runs, an engine started here for the duration of the command. A restore needs the server stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from infra.settings import Settings
from infra.storage import ObjectStore, StorageError
from infra.vectors import (
    IndexExistsError,
    IndexInUseError,
    IndexStats,
    SnapshotsUnsupportedError,
    VectorIndex,
    VectorIndexUnavailableError,
    attach_index,
    open_index,
)
from infra.vectors.backup import BackupInfo, IndexBackupError, IndexBackups, RestoreReport
from infra.vectors.edge.layout import EngineLayout
from processor.ops.errors import OperationFailedError
from processor.ops.stores import opened_store


@dataclass(frozen=True, slots=True)
class IndexReport:
    stats: IndexStats
    served_by_running_server: bool
    backups: list[BackupInfo] | None
    backups_error: str | None


@asynccontextmanager
async def reach_index(settings: Settings, *, exclusive: bool = False) -> AsyncIterator[tuple[VectorIndex, bool]]:
    """(index, whether a running server serves it). With `exclusive`, refuse when a server runs it."""
    try:
        index = await attach_index(settings)
        attached = index is not None
        if index is not None and exclusive:
            await index.close()
            raise OperationFailedError(
                f"the server is running on the index at {settings.image_search_db_path}: stop it first"
            )
        if index is None:
            index = await open_index(settings)
    except (VectorIndexUnavailableError, IndexInUseError) as exc:
        raise OperationFailedError(f"cannot reach the image index: {exc}") from None
    except OSError as exc:  # not the engine's answer: its socket is another user's, or the path is not a directory
        why = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror or str(exc)
        raise OperationFailedError(f"cannot reach the image index: {_where(settings)}: {why}") from None
    try:
        yield index, attached
    except VectorIndexUnavailableError as exc:
        raise OperationFailedError(f"the image index failed: {exc}") from None
    finally:
        await index.close()


def _where(settings: Settings) -> str:
    """Where the index is reached, for an error message."""
    if settings.qdrant_url:
        return f"the Qdrant server at {settings.qdrant_url} (QDRANT_URL)"
    socket_path = EngineLayout.under(settings.image_search_db_path, settings.qdrant_collection).socket_path
    return f"its engine's socket {socket_path} (IMAGE_SEARCH_DB_PATH={settings.image_search_db_path})"


def _refuse_a_qdrant_server(settings: Settings) -> None:
    """Backups and restores are of the embedded index; a Qdrant server's are refused before anything is reached."""
    if settings.qdrant_url:
        raise SnapshotsUnsupportedError("QDRANT_URL is set: the Qdrant server keeps its own data; use its snapshot API")


def _backups(settings: Settings, index: VectorIndex, store: ObjectStore) -> IndexBackups:
    return IndexBackups(
        index,
        store,
        settings.image_search_db_r2_key,
        generations=settings.image_search_db_backup_generations,
    )


async def index_report(settings: Settings) -> IndexReport:
    async with reach_index(settings) as (index, attached):
        stats = await index.stats()
        if not index.supports_snapshots:
            return IndexReport(stats, attached, None, None)
        try:
            async with opened_store(settings) as store:
                backups = await _backups(settings, index, store).list()
        except (OperationFailedError, StorageError) as exc:
            return IndexReport(stats, attached, None, str(exc))
        return IndexReport(stats, attached, backups, None)


async def backup_now(settings: Settings) -> BackupInfo:
    _refuse_a_qdrant_server(settings)
    async with reach_index(settings) as (index, _attached), opened_store(settings) as store:
        if (await index.stats()).model_id is None:
            raise OperationFailedError("there is no index to back up yet")
        try:
            return await _backups(settings, index, store).save()
        except StorageError as exc:
            raise OperationFailedError(f"the backup could not be stored: {exc}") from None


async def restore_backup(settings: Settings, key: str | None, *, replace: bool) -> RestoreReport:
    _refuse_a_qdrant_server(settings)
    async with reach_index(settings, exclusive=True) as (index, _attached), opened_store(settings) as store:
        try:
            report = await _backups(settings, index, store).restore(key, replace=replace)
        except IndexExistsError:
            raise OperationFailedError(
                f"an index already exists at {settings.image_search_db_path}; add --force to replace it"
            ) from None
        except (IndexBackupError, StorageError) as exc:
            raise OperationFailedError(str(exc)) from None
        if report is None:
            raise OperationFailedError(f"no index backup under {settings.image_search_db_r2_key!r}")
        return report


async def build_graph(settings: Settings, *, wait: bool) -> dict[str, Any] | None:
    async with reach_index(settings) as (index, _attached):
        if (await index.stats()).model_id is None:
            raise OperationFailedError("there is no index yet")
        return await index.build_graph(wait=wait)
