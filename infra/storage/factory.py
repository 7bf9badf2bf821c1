"""Build the object store the settings ask for."""

from __future__ import annotations

from infra.settings import Settings
from infra.storage.base import ObjectStore
from infra.storage.local import LocalStore
from infra.storage.s3 import S3Store


async def open_store(settings: Settings) -> ObjectStore:
    """R2/S3 when R2_ENABLED=1, else the embedded local-directory store."""
    if settings.r2_enabled:
        return await S3Store.connect(
            endpoint_url=settings.r2_effective_endpoint,
            bucket=settings.r2_bucket_name,
            access_key_id=settings.r2_access_key_id,
            secret_access_key=settings.r2_secret_access_key,
            region=settings.r2_region,
            timeout_seconds=settings.r2_timeout_seconds,
            max_connections=settings.r2_max_connections,
        )
    return LocalStore(
        settings.local_storage_dir,
        signing_key=settings.url_signing_key,
        public_base_url=settings.public_base_url,
    )
