"""The object store an operator command works on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from infra.settings import Settings
from infra.storage import ObjectStore, StorageError, open_store
from processor.ops.errors import OperationFailedError


@asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[ObjectStore]:
    """The store the settings name, checked to answer (else an OperationFailedError), closed afterwards."""
    try:
        store = await open_store(settings)
        await store.ping()
    except StorageError as exc:
        raise OperationFailedError(f"object store not usable: {exc}") from None
    try:
        yield store
    finally:
        await store.close()
