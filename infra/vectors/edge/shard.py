"""Qdrant Edge shards: configuration, payload indexes and filters (synchronous; used in the engine processes)."""

from __future__ import annotations

import math
from pathlib import Path

from qdrant_edge import (
    Distance,
    EdgeConfig,
    EdgeOptimizersConfig,
    EdgeShard,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    MatchAny,
    PayloadSchemaType,
    RangeFloat,
    UpdateOperation,
)

from infra.vectors.base import FIELD_CONTENT_TYPE, FIELD_CREATED, FIELD_SOURCE, ImageFilter

PAYLOAD_INDEXES = {
    FIELD_CREATED: PayloadSchemaType.Integer,
    FIELD_SOURCE: PayloadSchemaType.Keyword,
    FIELD_CONTENT_TYPE: PayloadSchemaType.Keyword,
}


def smallest_build(build_points: int) -> int:
    """The fewest waiting points worth a graph: a tenth of IMAGE_SEARCH_INDEX_BUILD_POINTS (at least 100)."""
    return max(100, build_points // 10)


def shard_config(dim: int, build_points: int) -> EdgeConfig:
    """Segments holding at least smallest_build() vectors get an HNSW graph when optimized."""
    threshold_kb = max(1, math.ceil(smallest_build(build_points) * dim * 4 / 1024))
    return EdgeConfig(
        vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine),
        optimizers=EdgeOptimizersConfig(indexing_threshold=threshold_kb),
    )


def create_shard(path: Path, dim: int, build_points: int) -> EdgeShard:
    shard = EdgeShard.create(str(path), shard_config(dim, build_points))
    for field, schema in PAYLOAD_INDEXES.items():
        shard.update(UpdateOperation.create_field_index(field, schema))
    return shard


def load_shard(path: Path) -> EdgeShard:
    return EdgeShard.load(str(path))


def edge_filter(image_filter: ImageFilter | None) -> Filter | None:
    if image_filter is None or image_filter.is_empty:
        return None
    must: list[FieldCondition] = []
    if image_filter.sources:
        must.append(FieldCondition(FIELD_SOURCE, match=MatchAny(list(image_filter.sources))))
    if image_filter.content_types:
        must.append(FieldCondition(FIELD_CONTENT_TYPE, match=MatchAny(list(image_filter.content_types))))
    if image_filter.created_after_us is not None or image_filter.created_before_us is not None:
        must.append(
            FieldCondition(
                FIELD_CREATED,
                range=RangeFloat(gt=image_filter.created_after_us, lt=image_filter.created_before_us),
            )
        )
    return Filter(must=must)
