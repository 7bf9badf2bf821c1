"""One-time import of a directory written by qdrant-client's local mode (this server's embedded index before
Qdrant Edge) into the embedded engine. Runs at start-up, before anything is served; the old files are then moved
to `migrated-local-mode/` under IMAGE_SEARCH_DB_PATH, and can be deleted once the new index looks right.

The import is idempotent (points keep their ids), so a crash half-way simply starts it again at the next start.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from infra.vectors.base import EmbeddingModelMismatchError, IndexInUseError, VectorIndexUnavailableError
from infra.vectors.edge.protocol import Upsert

log = structlog.get_logger(__name__)

MIGRATED_DIR = "migrated-local-mode"
_PAGE = 512
_LEGACY_FILES = ("meta.json", "collection", ".lock")


class LegacyLocalMode:
    def __init__(self, db_path: Path, collection: str) -> None:
        self.db_path = db_path
        self.collection = collection

    @classmethod
    def find(cls, db_path: Path, collection: str) -> LegacyLocalMode | None:
        try:
            meta = json.loads((db_path / "meta.json").read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if collection not in (meta.get("collections") or {}):
            return None
        return cls(db_path, collection)

    def _open(self) -> Any:
        from qdrant_client import QdrantClient

        try:
            return QdrantClient(path=str(self.db_path))
        except RuntimeError as exc:
            if "already accessed" in str(exc):
                raise IndexInUseError(
                    f"the old-format index at {self.db_path} is in use by another process; stop it, then start "
                    "this server again to import it"
                ) from exc
            raise

    def move_aside(self) -> Path:
        target = self.db_path / MIGRATED_DIR
        target.mkdir(exist_ok=True)
        for name in _LEGACY_FILES:
            source = self.db_path / name
            if source.exists():
                source.rename(target / name)
        return target


PointSink = Callable[[Upsert], Awaitable[None]]


async def import_legacy(
    legacy: LegacyLocalMode, model_id: str, dim: int, *, create: Callable[[], Awaitable[None]], sink: PointSink
) -> int:
    """Check the old collection's model, create the new index, copy every point; returns how many."""
    from qdrant_client import models

    client = await asyncio.to_thread(legacy._open)
    try:
        info = await asyncio.to_thread(client.get_collection, legacy.collection)
        params = info.config.params.vectors
        size = params.size if isinstance(params, models.VectorParams) else None
        built_with = (info.config.metadata or {}).get("embedding_model")
        if size != dim or (built_with is not None and built_with != model_id):
            raise EmbeddingModelMismatchError(
                f"the old-format index at {legacy.db_path} was built with embedding model {built_with!r} ({size} "
                f"dimensions) but the server is configured with {model_id!r} ({dim} dimensions); set "
                "CLIP_MODEL/CLIP_PRETRAINED back to import it, or move that directory away"
            )
        total = (await asyncio.to_thread(client.count, legacy.collection, exact=True)).count
        await create()
        log.info("index_migration_started", source=str(legacy.db_path), points=total)
        started = last_report = time.monotonic()
        imported, offset = 0, None
        while True:
            points, offset = await asyncio.to_thread(
                client.scroll, legacy.collection, limit=_PAGE, offset=offset, with_payload=True, with_vectors=True
            )
            vectors = np.asarray([point.vector for point in points], dtype=np.float32)
            await sink(
                Upsert(
                    [str(point.id) for point in points],
                    vectors.tobytes(),
                    [dict(point.payload or {}) for point in points],
                )
            )
            imported += len(points)
            if time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                log.info("index_migration_progress", imported=imported, points=total)
            if offset is None:
                break
    finally:
        await asyncio.to_thread(client.close)
    if imported < total:
        raise VectorIndexUnavailableError(f"imported {imported} of {total} points from {legacy.db_path}; try again")
    log.info("index_migration_imported", points=imported, seconds=round(time.monotonic() - started, 1))
    return imported
