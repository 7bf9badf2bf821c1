"""Start-up of what every process shares: the object store, the broker connections (one to consume, one for the
confirming publisher) and the image index. Each dependency's failure becomes one StartupError line that says what
to fix.

Publishing has a connection of its own, as RabbitMQ advises: under a disk or memory alarm RabbitMQ stops reading
a connection that publishes, acknowledgements included, so on a shared one a blocked publish would stop the
consumers from acknowledging (and so from draining the queues that may be what fills the disk).

The API and the processor each open their own Plumbing; the one-process launcher opens it once and hands it to
both.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractRobustConnection

from infra import broker
from infra.settings import Settings
from infra.storage import ObjectStore, StorageError, StorageUnavailableError, open_store
from infra.vectors import (
    EmbeddingModelMismatchError,
    IndexInUseError,
    VectorIndex,
    VectorIndexUnavailableError,
    attach_index,
    open_index,
)
from infra.vectors.backup import BackupSchedule, IndexBackupError, automatic_backups

log = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """A dependency is missing or misconfigured; the message says which and how to fix it."""


@dataclass(slots=True)
class Plumbing:
    """The object store and the broker, opened and checked."""

    settings: Settings
    store: ObjectStore
    connection: AbstractRobustConnection  # consuming: jobs, replies, queue depths
    publisher: broker.Publisher  # on a connection of its own

    @property
    def bucket(self) -> str:
        return self.settings.r2_bucket_name if self.settings.r2_enabled else "local"

    @classmethod
    async def open(cls, settings: Settings) -> Plumbing:
        store = await open_store(settings)
        try:
            await store.ping()
        except StorageError as exc:
            await store.close()
            raise StartupError(f"object store not usable: {exc}") from exc
        connections: list[AbstractRobustConnection] = []
        try:
            for _ in range(2):
                connections.append(await broker.connect(settings.amqp_url, settings.amqp_connect_timeout_seconds))
            publisher = await broker.Publisher.open(connections[1])
        except BaseException as exc:
            for connection in connections:
                await connection.close()
            await store.close()
            if isinstance(exc, broker.BrokerUnavailableError):
                raise StartupError(str(exc)) from exc
            raise
        return cls(settings, store, connections[0], publisher)

    def broker_state(self) -> str:
        """ok, disconnected (either connection), or blocked (the publishing one, under a disk or memory alarm)."""
        return "disconnected" if self.connection.is_closed else self.publisher.state()

    async def close(self) -> None:
        await self.publisher.connection.close()
        await self.connection.close()
        await self.store.close()


@dataclass(slots=True)
class OpenedIndex:
    """The image index, and the automatic backups when this process owns an embedded one."""

    index: VectorIndex
    backups: BackupSchedule | None

    async def close(self) -> None:
        if self.backups is not None:
            await self.backups.stop()
        await self.index.close()


def _startup_error(exc: BaseException, where: str) -> StartupError | None:
    """The one-line start-up error for an index failure, or None for anything else."""
    if isinstance(exc, (EmbeddingModelMismatchError, IndexInUseError)):
        return StartupError(str(exc))
    if isinstance(exc, IndexBackupError):
        return StartupError(f"{exc} (or set IMAGE_SEARCH_DB_BACKUP_ENABLED=0 to start without restoring a backup)")
    if isinstance(exc, VectorIndexUnavailableError):
        return StartupError(f"{exc} ({where})")
    if isinstance(exc, StorageUnavailableError):
        return StartupError(f"object store not usable: {exc} (reading the index backup; nothing was restored)")
    return None


async def open_image_index(
    settings: Settings, store: ObjectStore, model_id: str, dim: int, *, attach: bool = False
) -> OpenedIndex:
    """Open the image index for vectors of `model_id` (`dim` wide).

    The owner of an embedded index (attach=False) runs its engine, restores the newest backup into an empty one,
    and backs it up on schedule. With attach=True the process uses the engine another process owns (an API-only
    process beside a processor), or the Qdrant server; it never restores or backs up.
    """
    where = (
        f"QDRANT_URL={settings.qdrant_url}"
        if settings.qdrant_url
        else f"embedded index {settings.image_search_db_path}"
    )
    try:
        index = await (attach_index(settings) if attach else open_index(settings))
    except BaseException as exc:
        error = _startup_error(exc, where)
        if error is None:
            raise
        raise error from exc
    if index is None:
        raise StartupError(
            f"no process runs the embedded index at {settings.image_search_db_path}: it belongs to the processor "
            "that indexes (python -m processor), so start that first; or run both in one process "
            "(python -m launcher), or use a Qdrant server (QDRANT_URL)"
        )
    backups = None if attach else automatic_backups(settings, index, store, model_id)
    try:
        if backups is not None:
            await backups.assume_saved()
            if index.fresh:
                await backups.restore()
        await index.ensure_collection(model_id, dim)
    except BaseException as exc:
        await index.close()
        error = _startup_error(exc, where)
        if error is None:
            raise
        raise error from exc
    schedule = None
    if backups is not None:
        schedule = BackupSchedule(backups, settings.image_search_db_backup_interval_seconds)
        schedule.start()
    return OpenedIndex(index, schedule)
