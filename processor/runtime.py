"""Everything a process opens once at start-up and shares: storage, broker, vectors, models.

In the default single-process mode the API and the processor share one Runtime (the embedded index has one
owning process); in two-process mode each process opens its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractRobustConnection

from contract.imaging import configure_pixel_limit
from infra import broker
from infra.settings import Settings
from infra.storage import ObjectStore, StorageError, open_store
from infra.vectors import (
    EmbeddingModelMismatchError,
    IndexInUseError,
    VectorIndex,
    VectorIndexUnavailableError,
    open_index,
)
from infra.vectors.backup import BackupSchedule, IndexBackupError, automatic_backups
from models.clip import ClipEmbedder
from models.diffusion import ImageGenerator
from models.voice import VoiceCloner

log = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """A dependency is missing or misconfigured; the message says which and how to fix it."""


@dataclass(slots=True)
class Runtime:
    settings: Settings
    store: ObjectStore
    connection: AbstractRobustConnection
    publisher: broker.Publisher
    index: VectorIndex | None
    clip: ClipEmbedder | None
    generator: ImageGenerator | None = None
    voice: VoiceCloner | None = None
    backups: BackupSchedule | None = None

    @property
    def bucket(self) -> str:
        return self.settings.r2_bucket_name if self.settings.r2_enabled else "local"

    @classmethod
    async def open(cls, settings: Settings, *, processor: bool = True) -> Runtime:
        """Open what this process needs; `processor` says whether it runs the consumer (and so the generation
        models), or only the API (which needs CLIP for queries, but no generator)."""
        configure_pixel_limit(settings.image_search_max_pixels)
        store = await open_store(settings)
        try:
            await store.ping()
        except StorageError as exc:
            await store.close()
            raise StartupError(f"object store not usable: {exc}") from exc
        try:
            connection = await broker.connect(settings.amqp_url, settings.amqp_connect_timeout_seconds)
        except broker.BrokerUnavailableError as exc:
            await store.close()
            raise StartupError(str(exc)) from exc
        publisher = await broker.Publisher.open(connection)
        runtime = cls(settings, store, connection, publisher, None, None)
        try:
            if settings.image_search_enabled:
                runtime.clip = await asyncio.to_thread(ClipEmbedder.load, settings)
                runtime.index = await open_index(settings)
                backups = automatic_backups(settings, runtime.index, store, runtime.clip.model_id)
                if backups is not None and runtime.index.fresh:
                    await backups.restore()
                await runtime.index.ensure_collection(runtime.clip.model_id, runtime.clip.dim)
                if backups is not None:
                    runtime.backups = BackupSchedule(backups, settings.image_search_db_backup_interval_seconds)
                    runtime.backups.start()
            if settings.image_enabled and processor:
                runtime.generator = await asyncio.to_thread(ImageGenerator.load, settings)
            if settings.voice_enabled and processor:
                runtime.voice = await asyncio.to_thread(VoiceCloner.load, settings)
        except (EmbeddingModelMismatchError, IndexInUseError) as exc:
            await runtime.close()
            raise StartupError(str(exc)) from exc
        except IndexBackupError as exc:
            await runtime.close()
            raise StartupError(
                f"{exc} (or set IMAGE_SEARCH_DB_BACKUP_ENABLED=0 to start without restoring a backup)"
            ) from exc
        except VectorIndexUnavailableError as exc:
            await runtime.close()
            where = f"QDRANT_URL={settings.qdrant_url}" if settings.qdrant_url else "embedded index"
            raise StartupError(f"{exc} ({where})") from exc
        except BaseException:
            await runtime.close()
            raise
        log.info(
            "runtime_ready",
            storage=store.name,
            qdrant=settings.qdrant_url or f"embedded:{settings.image_search_db_path}",
            image_search=settings.image_search_enabled,
            image_generation=runtime.generator is not None,
            voice=runtime.voice is not None,
        )
        return runtime

    async def close(self) -> None:
        if self.backups is not None:
            await self.backups.stop()
        if self.index is not None:
            await self.index.close()
        await self.connection.close()
        await self.store.close()
