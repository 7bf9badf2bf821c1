"""Image vectors: one VectorIndex interface; a Qdrant server (QDRANT_URL set) or the embedded Qdrant Edge engine.

`open_index` picks the implementation from the settings; nothing outside infra/ knows which one runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infra.vectors.base import (
    EmbeddingModelMismatchError,
    EngineProtocolMismatchError,
    ImageFilter,
    ImageRecord,
    IndexExistsError,
    IndexInUseError,
    IndexStats,
    ListingPosition,
    SnapshotInfo,
    SnapshotsUnsupportedError,
    VectorIndex,
    VectorIndexUnavailableError,
)

if TYPE_CHECKING:
    from infra.settings import Settings

__all__ = [
    "EmbeddingModelMismatchError",
    "EngineProtocolMismatchError",
    "ImageFilter",
    "ImageRecord",
    "IndexExistsError",
    "IndexInUseError",
    "IndexStats",
    "ListingPosition",
    "SnapshotInfo",
    "SnapshotsUnsupportedError",
    "VectorIndex",
    "VectorIndexUnavailableError",
    "attach_index",
    "open_index",
]


async def open_index(settings: Settings) -> VectorIndex:
    """The index this deployment uses; the embedded engine is started (and owned) by this process."""
    if settings.qdrant_url:
        from infra.vectors.server import QdrantServerIndex

        return QdrantServerIndex.connect(
            url=settings.qdrant_url, api_key=settings.qdrant_api_key, collection=settings.qdrant_collection
        )
    from infra.vectors.edge.client import EdgeIndex

    return await EdgeIndex.open(
        settings.image_search_db_path,
        settings.qdrant_collection,
        build_points=settings.image_search_index_build_points,
        log_level=settings.log_level,
        log_format=settings.log_format,
    )


async def attach_index(settings: Settings) -> VectorIndex | None:
    """The index of a running server, without owning it: the Qdrant server, or the embedded engine another
    process runs (None when no process runs it)."""
    if settings.qdrant_url:
        return await open_index(settings)
    from infra.vectors.edge.client import EdgeIndex

    return await EdgeIndex.attach(settings.image_search_db_path, settings.qdrant_collection)
