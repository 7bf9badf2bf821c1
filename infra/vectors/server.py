"""The index on a Qdrant server, through qdrant-client (also opens qdrant-client's local mode on a path: the
shared contract tests use it as a stand-in for the server API, and the embedded engine imports old data from it).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import ParamSpec, TypeVar

import httpx
import msgspec
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from infra.vectors.base import (
    FIELD_CONTENT_TYPE,
    FIELD_CREATED,
    FIELD_SOURCE,
    EmbeddingModelMismatchError,
    ImageFilter,
    ImageRecord,
    IndexStats,
    ListingPosition,
    VectorIndex,
    VectorIndexUnavailableError,
    record_of,
)
from infra.vectors.listing import listing_page

MODEL_KEY = "embedding_model"
DIM_KEY = "embedding_dim"

P = ParamSpec("P")
R = TypeVar("R")

_PAYLOAD_INDEXES = {
    FIELD_CREATED: models.PayloadSchemaType.INTEGER,
    FIELD_SOURCE: models.PayloadSchemaType.KEYWORD,
    FIELD_CONTENT_TYPE: models.PayloadSchemaType.KEYWORD,
}


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


def server_filter(image_filter: ImageFilter | None) -> models.Filter | None:
    if image_filter is None or image_filter.is_empty:
        return None
    must: list[models.Condition] = []
    if image_filter.sources:
        must.append(models.FieldCondition(key=FIELD_SOURCE, match=models.MatchAny(any=list(image_filter.sources))))
    if image_filter.content_types:
        must.append(
            models.FieldCondition(key=FIELD_CONTENT_TYPE, match=models.MatchAny(any=list(image_filter.content_types)))
        )
    if image_filter.created_after_us is not None or image_filter.created_before_us is not None:
        must.append(
            models.FieldCondition(
                key=FIELD_CREATED,
                range=models.Range(gt=image_filter.created_after_us, lt=image_filter.created_before_us),
            )
        )
    return models.Filter(must=must)


class QdrantServerIndex(VectorIndex):
    engine = "qdrant-server"

    def __init__(self, client: AsyncQdrantClient, collection: str, *, location: str) -> None:
        self._client = client
        self.collection = collection
        self._location = location
        self._revision = 0
        self._model_id: str | None = None
        self._dim: int | None = None

    @classmethod
    def connect(cls, *, url: str, api_key: str, collection: str) -> QdrantServerIndex:
        return cls(AsyncQdrantClient(url=url, api_key=api_key or None, timeout=30), collection, location=url)

    @classmethod
    def local(cls, path: str, collection: str) -> QdrantServerIndex:
        """qdrant-client's local mode on a directory (a prototype engine: tests and migration only)."""
        index = cls(AsyncQdrantClient(path=path), collection, location=f"local:{path}")
        index.engine = "qdrant-client-local"
        return index

    async def revision(self) -> str:
        return str(self._revision)

    @_translated
    async def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the collection, or check that the one there was built with this model; of processes starting
        together on an empty server, the ones that lose the race to create it check the winner's."""
        self._model_id, self._dim = model_id, dim
        if await self._client.collection_exists(self.collection) or not await self._created(model_id, dim):
            info = await self._client.get_collection(self.collection)
            metadata = info.config.metadata or {}
            params = info.config.params.vectors
            size = params.size if isinstance(params, models.VectorParams) else None
            built_with = metadata.get(MODEL_KEY)
            if size != dim or (built_with is not None and built_with != model_id):
                raise EmbeddingModelMismatchError(
                    f"Qdrant collection {self.collection!r} was built with embedding model {built_with!r} "
                    f"({size} dimensions) but the server is configured with {model_id!r} ({dim} dimensions); "
                    "set CLIP_MODEL/CLIP_PRETRAINED back, or use another QDRANT_COLLECTION and re-index"
                )
        if self.engine == "qdrant-server":  # the local mode has no payload indexes (and warns)
            for field, schema in _PAYLOAD_INDEXES.items():
                await self._client.create_payload_index(self.collection, field, field_schema=schema)

    async def _created(self, model_id: str, dim: int) -> bool:
        """Create the collection; False when it exists already (Qdrant answers 409, or a 400 saying it "already
        exists"): another process created it since this one looked."""
        try:
            await self._client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                metadata={MODEL_KEY: model_id, DIM_KEY: dim},
            )
        except UnexpectedResponse as exc:
            if exc.status_code == 409 or b"already exists" in exc.content:
                return False
            raise
        return True

    @_translated
    async def upsert(self, items: Sequence[tuple[ImageRecord, Sequence[float]]]) -> None:
        points = [
            models.PointStruct(id=record.id, vector=list(vector), payload=msgspec.to_builtins(record))
            for record, vector in items
        ]
        await self._client.upsert(self.collection, points=points, wait=True)
        self._revision += 1

    @_translated
    async def search(
        self, vector: Sequence[float], limit: int, image_filter: ImageFilter | None = None
    ) -> list[tuple[ImageRecord, float]]:
        response = await self._client.query_points(
            self.collection,
            query=list(vector),
            limit=limit,
            with_payload=True,
            query_filter=server_filter(image_filter),
        )
        return [(record_of(point.payload), float(point.score)) for point in response.points]

    @_translated
    async def get_many(self, image_ids: Sequence[str]) -> dict[str, ImageRecord]:
        points = await self._client.retrieve(self.collection, ids=list(image_ids), with_payload=True)
        records = [record_of(point.payload) for point in points]
        return {record.id: record for record in records}

    @_translated
    async def vector(self, image_id: str) -> list[float] | None:
        points = await self._client.retrieve(self.collection, ids=[image_id], with_payload=False, with_vectors=True)
        if not points or not isinstance(points[0].vector, list):
            return None
        return [float(value) for value in points[0].vector]

    @_translated
    async def delete(self, image_id: str) -> None:
        await self._client.delete(self.collection, points_selector=models.PointIdsList(points=[image_id]), wait=True)
        self._revision += 1

    @_translated
    async def newest(
        self, limit: int, after: ListingPosition | None = None, image_filter: ImageFilter | None = None
    ) -> list[ImageRecord]:
        return await listing_page(
            limit, after, image_filter, newest_first=self._newest_first, in_id_order=self._in_id_order
        )

    async def _newest_first(self, limit: int, image_filter: ImageFilter) -> list[ImageRecord]:
        points, _ = await self._client.scroll(
            self.collection,
            scroll_filter=server_filter(image_filter),
            limit=limit,
            with_payload=True,
            order_by=models.OrderBy(key=FIELD_CREATED, direction=models.Direction.DESC),
        )
        return [record_of(point.payload) for point in points]

    async def _in_id_order(self, limit: int, start_id: str | None, image_filter: ImageFilter) -> list[ImageRecord]:
        """A scroll without order_by is in id order, and its offset is the first id it returns."""
        points, _ = await self._client.scroll(
            self.collection, scroll_filter=server_filter(image_filter), limit=limit, offset=start_id, with_payload=True
        )
        return [record_of(point.payload) for point in points]

    @_translated
    async def count(self, image_filter: ImageFilter | None = None) -> int:
        result = await self._client.count(self.collection, count_filter=server_filter(image_filter), exact=True)
        return result.count

    @_translated
    async def ping(self) -> None:
        await self._client.get_collection(self.collection)

    @_translated
    async def stats(self) -> IndexStats:
        info = await self._client.get_collection(self.collection)
        points = await self.count()
        metadata = info.config.metadata or {}
        return IndexStats(
            engine=self.engine,
            location=f"{self._location} collection {self.collection}",
            model_id=metadata.get(MODEL_KEY, self._model_id),
            dim=metadata.get(DIM_KEY, self._dim),
            points=points,
            indexed_points=info.indexed_vectors_count or 0,
            segments=info.segments_count or 0,
        )

    async def close(self) -> None:
        await self._client.close()
