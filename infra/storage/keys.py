"""Object key validation shared by every store."""

from __future__ import annotations

import re

from infra.storage.base import InvalidKeyError

MAX_KEY_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # control characters


def validate_key(key: str) -> str:
    """Return the key unchanged if it is safe to use with any store, else raise InvalidKeyError."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"object key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKeyError(f"object key {key!r} must not start with '/'")
    if _CONTROL.search(key):
        raise InvalidKeyError(f"object key {key!r} contains a control character")
    if "\\" in key:
        raise InvalidKeyError(f"object key {key!r} must not contain a backslash")
    segments = key.split("/")
    if any(segment in {".", ".."} for segment in segments):
        raise InvalidKeyError(f"object key {key!r} must not contain '.' or '..' segments")
    if any(segment == "" for segment in segments[:-1]) or key.endswith("/"):
        raise InvalidKeyError(f"object key {key!r} must not contain empty segments or end with '/'")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key-like string that may end with '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or "x")
    if prefix.startswith("/"):
        raise InvalidKeyError(f"prefix {prefix!r} must not start with '/'")
    return prefix
