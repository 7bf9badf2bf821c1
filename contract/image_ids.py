"""Where image ids, original keys and thumbnail keys come from; light enough for the operator CLI to import."""

from __future__ import annotations

import uuid

ORIGINALS_PREFIX = "images/originals/"
THUMBNAILS_PREFIX = "images/thumbs/"
_KEY_NAMESPACE = uuid.UUID("6f1c2f5e-8d0a-4c43-9a38-6a5b3f9e0c11")


def image_id_for_key(bucket: str, key: str) -> str:
    """The id of an image indexed in place: the same bucket and key always give the same id."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{bucket}/{key}"))


def original_key(image_id: str, extension: str) -> str:
    return f"{ORIGINALS_PREFIX}{image_id}.{extension}"


def thumbnail_key(image_id: str) -> str:
    """Where an indexed image's thumbnail (WebP) is stored, whether its original is ours or indexed in place."""
    return f"{THUMBNAILS_PREFIX}{image_id}.webp"
