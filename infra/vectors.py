"""Qdrant: the image vector collection, through qdrant-client (a server, or embedded on a local path)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import msgspec
import numpy as np
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

_MODEL_KEY = "embedding_model"
_DIM_KEY = "embedding_dim"


P = ParamSpec("P")
R = TypeVar("R")


class VectorIndexUnavailableError(ConnectionError):
    """Qdrant did not answer or answered with a server error; retrying may help."""


class EmbeddingModelMismatchError(RuntimeError):
    """The collection was built with another embedding model; searching it would return garbage."""


def _translated(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (ResponseHandlingException, httpx.TransportError, OSError) as exc:
            raise VectorIndexUnavailableError(f"Qdrant is unreachable: {exc}") from exc
        except UnexpectedResponse as exc:
            raise VectorIndexUnavailableError(f"Qdrant answered {exc.status_code}: {exc}") from exc

    return wrapper


class ImageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is known of an indexed image; stored as the Qdrant point payload."""

    id: str
    r2_key: str
    content_type: str
    size: int
    width: int
    height: int
    created_at: str
    created_us: int
    source: str
    filename: str | None = None


class SnapshotPoint(msgspec.Struct, frozen=True):
    id: str
    vector: bytes
    payload: dict[str, Any]


def _record(payload: dict[str, Any] | None) -> ImageRecord:
    return msgspec.convert(payload or {}, ImageRecord)


class VectorIndex:
    def __init__(self, client: AsyncQdrantClient, collection: str, *, embedded: bool) -> None:
        self._client = client
        self.collection = collection
        self._embedded = embedded
        self.revision = 0

    @classmethod
    def open(cls, *, url: str, api_key: str, path: Path, collection: str) -> VectorIndex:
        if url:
            return cls(AsyncQdrantClient(url=url, api_key=api_key or None, timeout=30), collection, embedded=False)
        path.mkdir(parents=True, exist_ok=True)
        return cls(AsyncQdrantClient(path=str(path)), collection, embedded=True)

    @_translated
    async def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the collection for this model, or check that an existing one was built with it."""
        if not await self._client.collection_exists(self.collection):
            await self._client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                metadata={_MODEL_KEY: model_id, _DIM_KEY: dim},
            )
            if not self._embedded:  # the embedded mode orders by payload without an index
                await self._client.create_payload_index(
                    self.collection, "created_us", field_schema=models.PayloadSchemaType.INTEGER
                )
            return
        info = await self._client.get_collection(self.collection)
        metadata = info.config.metadata or {}
        params = info.config.params.vectors
        size = params.size if isinstance(params, models.VectorParams) else None
        built_with = metadata.get(_MODEL_KEY)
        if size != dim or (built_with is not None and built_with != model_id):
            raise EmbeddingModelMismatchError(
                f"Qdrant collection {self.collection!r} was built with embedding model {built_with!r} "
                f"({size} dimensions) but the server is configured with {model_id!r} ({dim} dimensions); "
                "set CLIP_MODEL/CLIP_PRETRAINED back, or use another QDRANT_COLLECTION and re-index"
            )

    @_translated
    async def upsert(self, items: Sequence[tuple[ImageRecord, Sequence[float]]]) -> None:
        points = [
            models.PointStruct(id=record.id, vector=list(vector), payload=msgspec.to_builtins(record))
            for record, vector in items
        ]
        await self._client.upsert(self.collection, points=points, wait=True)
        self.revision += 1

    @_translated
    async def search(self, vector: Sequence[float], limit: int) -> list[tuple[ImageRecord, float]]:
        response = await self._client.query_points(self.collection, query=list(vector), limit=limit, with_payload=True)
        return [(_record(point.payload), float(point.score)) for point in response.points]

    @_translated
    async def get(self, image_id: str) -> ImageRecord | None:
        points = await self._client.retrieve(self.collection, ids=[image_id], with_payload=True)
        return _record(points[0].payload) if points else None

    @_translated
    async def get_many(self, image_ids: Sequence[str]) -> dict[str, ImageRecord]:
        points = await self._client.retrieve(self.collection, ids=list(image_ids), with_payload=True)
        records = [_record(point.payload) for point in points]
        return {record.id: record for record in records}

    @_translated
    async def delete(self, image_id: str) -> None:
        await self._client.delete(self.collection, points_selector=models.PointIdsList(points=[image_id]), wait=True)
        self.revision += 1

    @_translated
    async def export_points(self, page_size: int = 1000) -> list[SnapshotPoint]:
        """Every point with its vector and payload (for snapshots)."""
        exported: list[SnapshotPoint] = []
        offset: Any = None
        while True:
            points, offset = await self._client.scroll(
                self.collection, limit=page_size, offset=offset, with_payload=True, with_vectors=True
            )
            exported += [
                SnapshotPoint(
                    id=str(point.id),
                    vector=np.asarray(point.vector, dtype=np.float32).tobytes(),
                    payload=dict(point.payload or {}),
                )
                for point in points
            ]
            if offset is None:
                return exported

    @_translated
    async def import_points(self, points: Sequence[SnapshotPoint], page_size: int = 1000) -> None:
        for start in range(0, len(points), page_size):
            page = points[start : start + page_size]
            await self._client.upsert(
                self.collection,
                points=[
                    models.PointStruct(
                        id=point.id,
                        vector=np.frombuffer(point.vector, dtype=np.float32).tolist(),
                        payload=point.payload,
                    )
                    for point in page
                ],
                wait=True,
            )

    @_translated
    async def newest(self, limit: int, before_us: int | None = None) -> list[ImageRecord]:
        """Records newest first; with before_us, only those created strictly before it."""
        scroll_filter = None
        if before_us is not None:
            scroll_filter = models.Filter(
                must=[models.FieldCondition(key="created_us", range=models.Range(lt=before_us))]
            )
        points, _ = await self._client.scroll(
            self.collection,
            scroll_filter=scroll_filter,
            limit=limit,
            with_payload=True,
            order_by=models.OrderBy(key="created_us", direction=models.Direction.DESC),
        )
        return [_record(point.payload) for point in points]

    @_translated
    async def count(self) -> int:
        result = await self._client.count(self.collection, exact=True)
        return result.count

    @_translated
    async def ping(self) -> None:
        await self._client.get_collection(self.collection)

    async def close(self) -> None:
        await self._client.close()
