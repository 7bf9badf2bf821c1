"""The object store interface and its errors."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


class StorageError(Exception):
    """Base class of storage failures."""


class InvalidKeyError(StorageError, ValueError):
    """The key is unsafe or malformed (a client error, never retried)."""


class ObjectNotFoundError(StorageError, KeyError):
    """No object under that key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no object at key {self.key!r}"


class PreconditionFailedError(StorageError):
    """A conditional write found the object not as expected: present (create) or changed or gone (update, delete)."""

    def __init__(self, key: str, condition: str) -> None:
        super().__init__(key, condition)
        self.key = key
        self.condition = condition

    def __str__(self) -> str:
        return f"conditional write of {self.key!r} refused ({self.condition})"


class ObjectTooLargeError(StorageError):
    """get(..., max_bytes=N) found an object larger than N bytes; `size` is its size where the store says it."""

    def __init__(self, key: str, max_bytes: int, size: int | None) -> None:
        super().__init__(key)
        self.key, self.max_bytes, self.size = key, max_bytes, size

    def __str__(self) -> str:
        found = f"{self.size} bytes" if self.size is not None else f"more than {self.max_bytes} bytes"
        return f"object {self.key!r} is {found}, more than the {self.max_bytes} allowed"


class StorageUnavailableError(StorageError):
    """The store did not answer or answered with a server error; retrying may help."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    data: bytes
    content_type: str
    etag: str = ""  # the version, for a conditional update (put(..., if_match=etag))


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # when the object was last written (UTC, as the store's clock says)


class ObjectStore(abc.ABC):
    """Async object storage. Every method validates its key first."""

    name: str

    @abc.abstractmethod
    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        durable: bool = True,
        background: bool = False,
    ) -> str:
        """Write the whole object atomically: readers see the old object or the new one, never a part. Returns
        the new version's ETag.

        Conditional writes (S3/R2 `If-None-Match: *` and `If-Match`): with if_none_match, only when no object
        exists under the key; with if_match, only when the object is still at that ETag. Otherwise
        PreconditionFailedError, and nothing is written. Of two racing conditional writes, one wins.

        durable=False is for data that can be rebuilt, or that flush() makes durable later: a store on a local
        disk may then skip flushing it to the disk, so a power failure may lose the write, or leave the object
        empty (readers must cope); an object store over HTTP stores it as always.

        background=True for a write that runs beside other work and that nobody waits on soon (a job's running
        mark): a store that makes small writes on the event loop makes this one in a thread instead, leaving the
        loop to the steps of the work itself."""

    async def flush(self, key: str) -> None:  # noqa: B027 - nothing to do unless a store defers flushing
        """Make durable what put(..., durable=False) wrote under `key` (whatever version is there now), so a write
        can be seen at once and flushed later, off the path of whoever waits for it. Nothing to do for an object
        store over HTTP, which stores every write durably."""

    @abc.abstractmethod
    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Write the object from a local file, streamed (large objects in parts); as atomic as put()."""

    @abc.abstractmethod
    async def get_file(self, key: str, path: Path) -> int:
        """Stream an object into a local file; returns its size. ObjectNotFoundError if absent."""

    @abc.abstractmethod
    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        """Read an object; ObjectNotFoundError if absent. With max_bytes, ObjectTooLargeError for an object larger
        than that, having read no more than max_bytes + 1 of it (an object that does not belong where it was asked
        for, such as a video under an image prefix, is never held in memory whole)."""

    @abc.abstractmethod
    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """Remove an object; returns whether it existed. Deleting an absent key is not an error.

        With if_match (S3 `If-Match` on DeleteObject), only when the object is still at that ETag; otherwise
        PreconditionFailedError (an object gone meanwhile included), and nothing is deleted."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object exists under the key."""

    @abc.abstractmethod
    async def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is no object under the key."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with prefix, in key order."""

    @abc.abstractmethod
    async def remove_abandoned_writes(self, prefix: str) -> int:
        """Remove what writes that never ended left in the store (an upload in parts under `prefix` whose process
        stopped, or whose abort the store did not answer), never a write still going on; returns how many it
        removed. Any process may run it at any time, several at once."""

    @abc.abstractmethod
    async def presigned_get_url(self, key: str, ttl_seconds: int) -> str:
        """A URL that downloads the object without credentials until it expires."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the store answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
