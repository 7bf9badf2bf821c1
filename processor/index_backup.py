"""Snapshots of the embedded vector index to R2, as the seed server backed up its vector DB.

With embedded Qdrant (QDRANT_URL unset), R2 enabled and IMAGE_SEARCH_DB_BACKUP_ENABLED=1, the index is written
to the object IMAGE_SEARCH_DB_R2_KEY every IMAGE_SEARCH_DB_BACKUP_INTERVAL_SECONDS when it changed, and once more
at shutdown; a server that starts with an empty index restores it from that snapshot. A Qdrant server keeps its
own data, so no snapshots are taken then.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import msgspec
import structlog

from infra.storage import ObjectNotFoundError, ObjectStore, StorageError
from infra.vectors import SnapshotPoint, VectorIndex

log = structlog.get_logger(__name__)

SNAPSHOT_FORMAT = "ams-index-snapshot/1"
SNAPSHOT_CONTENT_TYPE = "application/msgpack"


class IndexSnapshot(msgspec.Struct, kw_only=True):
    format: str
    model_id: str
    created_at: str
    points: list[SnapshotPoint]


class IndexBackup:
    def __init__(
        self,
        *,
        index: VectorIndex,
        store: ObjectStore,
        key: str,
        interval_seconds: int,
        model_id: str,
    ) -> None:
        self._index = index
        self._store = store
        self._key = key
        self._interval = interval_seconds
        self._model_id = model_id
        self._saved_revision = index.revision
        self._task: asyncio.Task[None] | None = None

    async def restore_if_empty(self) -> int:
        """Load the snapshot into an empty index; returns how many points were restored."""
        if await self._index.count() > 0:
            return 0
        try:
            stored = await self._store.get(self._key)
        except ObjectNotFoundError:
            return 0
        except StorageError as exc:
            log.warning("index_snapshot_unavailable", key=self._key, error=str(exc))
            return 0
        try:
            snapshot = msgspec.msgpack.decode(stored.data, type=IndexSnapshot)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("index_snapshot_unreadable", key=self._key, error=str(exc))
            return 0
        if snapshot.format != SNAPSHOT_FORMAT or snapshot.model_id != self._model_id:
            log.warning(
                "index_snapshot_skipped",
                key=self._key,
                reason="built with another embedding model or format",
                snapshot_model=snapshot.model_id,
                model=self._model_id,
            )
            return 0
        await self._index.import_points(snapshot.points)
        self._saved_revision = self._index.revision
        log.info("index_restored", key=self._key, points=len(snapshot.points), snapshot_at=snapshot.created_at)
        return len(snapshot.points)

    async def save(self) -> int:
        """Write a snapshot of the whole index; returns the point count."""
        revision = self._index.revision
        points = await self._index.export_points()
        snapshot = IndexSnapshot(
            format=SNAPSHOT_FORMAT,
            model_id=self._model_id,
            created_at=datetime.now(tz=UTC).isoformat(),
            points=points,
        )
        data = msgspec.msgpack.encode(snapshot)
        await self._store.put(self._key, data, SNAPSHOT_CONTENT_TYPE)
        self._saved_revision = revision
        log.info("index_backed_up", key=self._key, points=len(points), bytes=len(data))
        return len(points)

    @property
    def changed(self) -> bool:
        return self._index.revision != self._saved_revision

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="index-backup")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self.changed:
                try:
                    await self.save()
                except Exception:
                    log.exception("index_backup_failed", key=self._key)

    async def stop(self) -> None:
        """Stop the periodic task and take a last snapshot if anything changed since the previous one."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.changed:
            try:
                await self.save()
            except Exception:
                log.exception("index_backup_failed", key=self._key)
