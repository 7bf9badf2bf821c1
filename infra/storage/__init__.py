"""Object storage: one async interface, an R2/S3 implementation and an embedded local-directory one."""

from infra.storage.base import (
    InvalidKeyError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
    StoredObject,
)
from infra.storage.factory import open_store
from infra.storage.keys import validate_key

__all__ = [
    "InvalidKeyError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectTooLargeError",
    "PreconditionFailedError",
    "StorageError",
    "StorageUnavailableError",
    "StoredObject",
    "open_store",
    "validate_key",
]
