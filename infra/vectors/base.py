"""The vector index interface, its records, filters and errors; two implementations live beside it."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

FIELD_CREATED = "created_us"
FIELD_SOURCE = "source"
FIELD_CONTENT_TYPE = "content_type"


class VectorIndexUnavailableError(ConnectionError):
    """The vector engine did not answer or failed; retrying may help."""


class EngineProtocolMismatchError(VectorIndexUnavailableError):
    """The embedded index's engine speaks another protocol version than this code: it answers again once the server
    that owns the index is restarted (its engine then runs the code installed now); retrying does not help."""


class EmbeddingModelMismatchError(RuntimeError):
    """The index was built with another embedding model; searching it would return garbage."""


class IndexInUseError(RuntimeError):
    """Another process owns the embedded index directory."""


class IndexExistsError(RuntimeError):
    """A restore would replace an existing index and was not told to."""


class SnapshotsUnsupportedError(RuntimeError):
    """This index keeps its own data (a Qdrant server): snapshots are taken there, not by this server."""


class ImageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is known of an indexed image; stored as the point's payload.

    `thumbnail` is true when the indexer stored the image's thumbnail before it wrote this point, so the API can
    redirect to it without asking the store; points written before thumbnails existed lack it (false), and the API
    then looks for the thumbnail, or makes it, when it is first asked for."""

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
    thumbnail: bool = False


class ImageFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Conditions on image records; all given ones must hold (an empty tuple means any value)."""

    sources: tuple[str, ...] = ()
    content_types: tuple[str, ...] = ()
    created_after_us: int | None = None
    created_before_us: int | None = None

    @property
    def is_empty(self) -> bool:
        return (
            not (self.sources or self.content_types)
            and self.created_after_us is None
            and (self.created_before_us is None)
        )

    def before(self, created_us: int) -> ImageFilter:
        """This filter narrowed to records created strictly before `created_us` (listing pages)."""
        bound = created_us if self.created_before_us is None else min(created_us, self.created_before_us)
        return msgspec.structs.replace(self, created_before_us=bound)

    def at(self, created_us: int) -> ImageFilter:
        """This filter narrowed to records created in the microsecond `created_us` (the ties of a listing page)."""
        after = created_us - 1 if self.created_after_us is None else max(created_us - 1, self.created_after_us)
        before = created_us + 1 if self.created_before_us is None else min(created_us + 1, self.created_before_us)
        return msgspec.structs.replace(self, created_after_us=after, created_before_us=before)


class ListingPosition(msgspec.Struct, frozen=True, kw_only=True):
    """A place in the listing's order, newest first (`created_us` descending), records created in the same
    microsecond by id (ascending, as UUIDs compare): a page starts strictly after it. Without `image_id` it stands
    after every record created at `created_us` (what a listing cursor named before ties were broken)."""

    created_us: int
    image_id: str | None = None

    @classmethod
    def of(cls, record: ImageRecord) -> ListingPosition:
        """The position of a record: the next page starts with the record after it."""
        return cls(created_us=record.created_us, image_id=record.id)


class IndexStats(msgspec.Struct, kw_only=True):
    """What an index holds and how far its search graph is built."""

    engine: str
    location: str
    model_id: str | None
    dim: int | None
    points: int
    indexed_points: int
    segments: int
    disk_bytes: int | None = None
    building: bool = False
    last_build: dict[str, Any] | None = None


class SnapshotInfo(msgspec.Struct, kw_only=True):
    """A consistent copy of the index files in `path`, taken at `created_at`."""

    path: str
    model_id: str
    dim: int
    points: int
    created_at: str


def record_of(payload: dict[str, Any] | None) -> ImageRecord:
    return msgspec.convert(payload or {}, ImageRecord)


class VectorIndex(abc.ABC):
    """Image vectors (cosine) with their records as payload. Every call is async and none blocks the loop."""

    engine: str
    supports_snapshots: bool = False

    @property
    def fresh(self) -> bool:
        """True when this index had no data at all when opened (a restore from backup may fill it)."""
        return False

    @abc.abstractmethod
    async def revision(self) -> str:
        """A value that changes with every write to the index (what backups compare to know whether it changed).

        The embedded engine counts the writes of every process attached to it (an API beside the processor that
        owns it included), and gives a new value once it restarted; a Qdrant server's index counts the writes made
        through this object (the server keeps and backs up its own data)."""

    @abc.abstractmethod
    async def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the index for this model, or check that an existing one was built with it."""

    @abc.abstractmethod
    async def upsert(self, items: Sequence[tuple[ImageRecord, Sequence[float]]]) -> None:
        """Insert or replace points (id = record id); durable when this returns."""

    @abc.abstractmethod
    async def search(
        self, vector: Sequence[float], limit: int, image_filter: ImageFilter | None = None
    ) -> list[tuple[ImageRecord, float]]:
        """The nearest records, highest cosine similarity first."""

    @abc.abstractmethod
    async def get_many(self, image_ids: Sequence[str]) -> dict[str, ImageRecord]:
        """The records of those ids that exist."""

    async def get(self, image_id: str) -> ImageRecord | None:
        return (await self.get_many([image_id])).get(image_id)

    @abc.abstractmethod
    async def vector(self, image_id: str) -> list[float] | None:
        """The stored vector of a point (as the engine keeps it: normalised), or None when there is no such point."""

    @abc.abstractmethod
    async def delete(self, image_id: str) -> None:
        """Remove a point; removing an absent one is not an error."""

    @abc.abstractmethod
    async def newest(
        self, limit: int, after: ListingPosition | None = None, image_filter: ImageFilter | None = None
    ) -> list[ImageRecord]:
        """Records in the listing's order (newest first, then by id: see ListingPosition); with `after`, only
        those strictly after that position."""

    @abc.abstractmethod
    async def count(self, image_filter: ImageFilter | None = None) -> int:
        """Exact number of points (matching the filter)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise VectorIndexUnavailableError unless the engine answers."""

    @abc.abstractmethod
    async def stats(self) -> IndexStats: ...

    async def build_graph(self, *, wait: bool = False) -> dict[str, Any] | None:
        """Build the search graph of the points not yet in it now (a Qdrant server does this by itself);
        with `wait`, return when done, with what the build did."""
        return None

    def scratch_dir(self) -> Path:
        """A directory on the index's filesystem for staging a restore (moved into place without a copy)."""
        raise SnapshotsUnsupportedError(f"the {self.engine} index keeps its own data; use its snapshot API")

    async def snapshot(self) -> SnapshotInfo:
        """A consistent copy of the index files on this machine (the caller removes it)."""
        raise SnapshotsUnsupportedError(f"the {self.engine} index keeps its own data; use its snapshot API")

    async def install(self, source: Path, *, model_id: str, dim: int, replace: bool = False) -> None:
        """Make the index files in `source` (a snapshot) the index; refused if one exists unless `replace`."""
        raise SnapshotsUnsupportedError(f"the {self.engine} index keeps its own data; use its snapshot API")

    @abc.abstractmethod
    async def close(self) -> None: ...
