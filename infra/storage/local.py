"""The embedded object store: a local directory, used when R2 is disabled.

Layout under the root directory:
    objects/<key>        the bytes
    types/<xx>/<h>.json  {"key": ..., "content_type": ...}, unless it is the usual type for the key's suffix
                         (SUFFIX_TYPES): job records, PNGs, MP3s, WebP thumbnails and JPEGs are written without one.
                         h is the SHA-256 of the key, xx its first two digits: no key's type file is in the way of
                         another's
    meta/<key>.json      a type file of the layout before types/, read first (a process of an earlier version may
                         still write one) and removed when its object is written again or deleted. That layout could
                         not keep both `a` and `a.json/b`: the type file of the one was the folder the other's needed
    tmp/                 staging for atomic writes (same filesystem, then os.replace), and the replaced versions
                         of objects until they are unlinked; what a stopped process left there is removed an hour on
                         (when a store opens, and by remove_abandoned_writes: the processors' hourly sweep)
    signing.key          HMAC secret for presigned URLs when URL_SIGNING_KEY is not set

"Presigned" URLs are HMAC-signed, expiring paths that the API serves itself (GET /v1/files/<key>).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote, urlencode

import structlog

from infra.disk import fsync_path
from infra.storage.base import (
    InvalidKeyError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageUnavailableError,
    StoredObject,
)
from infra.storage.keys import validate_key, validate_prefix

FILES_ROUTE = "/v1/files/"
# the content type an object has when no meta file says otherwise
SUFFIX_TYPES = {
    ".json": "application/json",
    ".png": "image/png",
    ".mp3": "audio/mpeg",
    ".webp": "image/webp",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}
DEFAULT_TYPE = "application/octet-stream"
# a file name is at most 255 bytes; the layout before types/ added ".json" to a segment, and servers' OpenAPI
# documents publish this limit, so it stays
MAX_SEGMENT_BYTES = 250
# An unflushed write up to this size, into a folder that exists, only reaches the page cache, and a read of an object
# this small (or of one that is not there) is served from it: both are made on the event loop (tenths of a
# millisecond) instead of paying two thread hand-offs around them.
INLINE_BYTES = 64 * 1024
STALE_STAGING_SECONDS = 3600  # no write takes this long: a staging file this old was left by a stopped process
SECRET_BYTES = 32  # of randomness in a generated signing.key
SECRET_LENGTH = len(secrets.token_urlsafe(SECRET_BYTES))  # its length as written (URL-safe base64)

log = structlog.get_logger(__name__)


def _suffix_type(key: str) -> str:
    dot = key.rfind(".")
    return SUFFIX_TYPES.get(key[dot:].lower(), DEFAULT_TYPE) if dot > key.rfind("/") else DEFAULT_TYPE


def _file_key(key: str) -> str:
    """A valid key whose segments can be file names here (MAX_SEGMENT_BYTES); InvalidKeyError for a segment longer
    than that, which an object store over HTTP would take."""
    validate_key(key)
    if any(len(os.fsencode(segment)) > MAX_SEGMENT_BYTES for segment in key.split("/")):
        raise InvalidKeyError(
            f"object key {key!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes, more than the embedded store "
            "keeps as a file name"
        )
    return key


def _etag(data: bytes) -> str:
    """The object's version: the MD5 of its bytes, as S3 gives for a single-part upload."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


P = ParamSpec("P")
T = TypeVar("T")


def _disk_errors(
    operation: Callable[Concatenate[LocalStore, str, P], Awaitable[T]],
) -> Callable[Concatenate[LocalStore, str, P], Awaitable[T]]:
    """An OSError of the disk under the store (full, read-only, failing) is the store being unavailable, as an
    object store that does not answer is: retried by the processor, a 503 with Retry-After from the API."""

    @functools.wraps(operation)
    async def guarded(store: LocalStore, key: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await operation(store, key, *args, **kwargs)
        except OSError as exc:
            raise StorageUnavailableError(f"the embedded store's disk failed on {key!r}: {exc}") from exc

    return guarded


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class LocalStore(ObjectStore):
    name = "local"

    def __init__(self, root: Path, signing_key: str = "", public_base_url: str = "") -> None:
        self.root = root
        self._objects = root / "objects"
        self._types = root / "types"
        self._earlier_types = root / "meta"
        self._tmp = root / "tmp"
        self._conditions_lock = root / "conditional-writes.lock"
        for path in (self._objects, self._types, self._tmp):
            path.mkdir(parents=True, exist_ok=True)
        self._sweep_staging()
        # unlinks the versions that writes replaced, after the writes (see _set_aside)
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-store-reaper")
        self._secret = signing_key.encode() if signing_key else self._load_or_create_secret()
        self._public_base_url = public_base_url

    def _load_or_create_secret(self) -> bytes:
        """The key in signing.key, made on first use. Processes opening the store together take turns under the
        store's lock (flock), and a new key is staged, flushed and moved into place, so none reads it half-written;
        a key found empty or short (left by a process stopped while writing it) is replaced."""
        path = self.root / "signing.key"
        with self._conditions_lock.open("a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                found = path.read_bytes().strip()
            except FileNotFoundError:
                found = None
            if found is not None and len(found) >= SECRET_LENGTH:
                return found
            if found is not None:
                log.warning("signing_key_replaced", path=str(path), length=len(found), expected=SECRET_LENGTH)
            secret = secrets.token_urlsafe(SECRET_BYTES).encode()
            self._write_atomic(path, lambda fh: fh.write(secret))
            return secret

    def _sweep_staging(self) -> int:
        """Remove the staging files and set-aside versions that a process stopped mid-write left behind; returns how
        many."""
        cutoff = time.time() - STALE_STAGING_SECONDS
        removed = 0
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(OSError):  # gone meanwhile, or another process's: left as it is
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_ctime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    @_disk_errors
    async def remove_abandoned_writes(self, prefix: str) -> int:
        """As ObjectStore.remove_abandoned_writes: the staging files a process stopped mid-write left (as when a store
        is opened), whatever their key; a staging file carries none, so `prefix` is only checked."""
        validate_prefix(prefix)
        return await asyncio.to_thread(self._sweep_staging)

    def _object_path(self, key: str) -> Path:
        return self._objects / _file_key(key)

    def _type_path(self, key: str) -> Path:
        digest = hashlib.sha256(os.fsencode(_file_key(key))).hexdigest()
        return self._types / digest[:2] / f"{digest}.json"

    def _earlier_type_path(self, key: str) -> Path:
        return self._earlier_types / f"{_file_key(key)}.json"

    def _content_type(self, key: str) -> str:
        """What the key's type file says (one of the layout before types/ first: only a process of an earlier
        version writes one now), else the usual type of its suffix."""
        for path in (self._earlier_type_path(key), self._type_path(key)):
            try:
                return json.loads(path.read_bytes())["content_type"]
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # a folder there is another key's, in the layout before types/
            except (ValueError, KeyError, TypeError):
                return DEFAULT_TYPE
        return _suffix_type(key)

    def _remove_earlier_type(self, key: str) -> None:
        """Remove the key's type file of the layout before types/, if there is one, and the folders it leaves empty."""
        path = self._earlier_type_path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        self._prune_empty_parents(path.parent, self._earlier_types)

    def _write_atomic(self, target: Path, fill: Callable[[BinaryIO], object], durable: bool = True) -> None:
        """Write through `fill(file)` into a staging file, then move it into place. When durable, the file is
        flushed before the move and its directory after it, so the new object is on the disk, under its name,
        when this returns."""
        self._make_parents(target)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            aside = self._set_aside(target)
            try:
                os.replace(tmp_name, target)
            finally:
                if aside is not None:
                    self._reap(aside)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        if durable:
            fsync_path(target.parent)

    def _set_aside(self, target: Path) -> str | None:
        """A second name in the staging folder for the file `target` names, if any, so that replacing it does not
        free that file on the writer's time (0.3 ms of a write here on ext4); the reaper unlinks it afterwards.
        None when there is nothing to keep aside, or the filesystem has no hard links."""
        aside = os.path.join(self._tmp, f"{secrets.token_hex(8)}.replaced")
        try:
            os.link(target, aside, follow_symlinks=False)
        except OSError:
            return None
        return aside

    def _reap(self, aside: str) -> None:
        try:
            self._reaper.submit(_unlink_quietly, aside)
        except RuntimeError:  # the interpreter is shutting down: no more threads
            _unlink_quietly(aside)

    def _make_parents(self, target: Path) -> None:
        """Create the folders above `target` that are missing, each made durable in its parent at once (a folder is
        made once per key prefix, and a later flush of an object then only needs the object's own folder)."""
        missing: list[Path] = []
        folder = target.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            fsync_path(folder.parent)

    def _put_sync(self, key: str, fill: Callable[[BinaryIO], object], content_type: str, durable: bool = True) -> None:
        try:
            self._write_object(key, fill, content_type, durable)
        except NotADirectoryError as exc:
            raise StorageUnavailableError(f"cannot store {key!r}: a parent of it is an object") from exc

    def _write_object(self, key: str, fill: Callable[[BinaryIO], object], content_type: str, durable: bool) -> None:
        path = self._object_path(key)
        if path.is_dir():
            raise StorageUnavailableError(f"cannot store {key!r}: a key prefix of that name exists")
        if content_type == _suffix_type(key):
            self._type_path(key).unlink(missing_ok=True)  # one an earlier write of another type left
        else:
            meta = json.dumps({"key": key, "content_type": content_type}).encode()
            self._write_atomic(self._type_path(key), lambda fh: fh.write(meta), durable)
        self._remove_earlier_type(key)
        self._write_atomic(path, fill, durable)

    def _put_bytes_sync(self, key: str, data: bytes, content_type: str, durable: bool) -> str:
        self._put_sync(key, lambda fh: fh.write(data), content_type, durable)
        return _etag(data)

    @_disk_errors
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
        """As ObjectStore.put. A small unflushed write (INLINE_BYTES) is made on the event loop, unless it
        is a background one, or a conditional one that finds the store's lock held; others in a thread, which also
        computes the ETag (the MD5 of the bytes: an original of a few hundred kilobytes takes a good part of a
        millisecond)."""
        validate_key(key)
        inline = not durable and not background and len(data) <= INLINE_BYTES and self._object_path(key).parent.is_dir()
        if not if_none_match and if_match is None:
            if inline:
                return self._put_bytes_sync(key, data, content_type, durable)
            return await asyncio.to_thread(self._put_bytes_sync, key, data, content_type, durable)
        if inline:
            etag = self._try_put_conditional_sync(key, data, content_type, if_none_match, if_match, durable)
            if etag is not None:
                return etag
        return await asyncio.to_thread(
            self._put_conditional_sync, key, data, content_type, if_none_match, if_match, durable
        )

    def _put_conditional_sync(
        self, key: str, data: bytes, content_type: str, if_none_match: bool, if_match: str | None, durable: bool
    ) -> str:
        """Check and write under an exclusive lock on the store (flock: across threads and processes); returns the
        new ETag."""
        with self._conditions_lock.open("a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._check_and_put(key, data, content_type, if_none_match, if_match, durable)

    def _try_put_conditional_sync(
        self, key: str, data: bytes, content_type: str, if_none_match: bool, if_match: str | None, durable: bool
    ) -> str | None:
        """As _put_conditional_sync, but None at once, nothing written, when another writer holds the lock."""
        with self._conditions_lock.open("a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            return self._check_and_put(key, data, content_type, if_none_match, if_match, durable)

    def _check_and_put(
        self, key: str, data: bytes, content_type: str, if_none_match: bool, if_match: str | None, durable: bool
    ) -> str:
        current = self._current_etag(self._object_path(key))
        if if_none_match and current is not None:
            raise PreconditionFailedError(key, "If-None-Match: *")
        if if_match is not None and current != if_match:
            raise PreconditionFailedError(key, f"If-Match: {if_match}")
        return self._put_bytes_sync(key, data, content_type, durable)

    @staticmethod
    def _current_etag(path: Path) -> str | None:
        """The ETag of the object at `path`; None when there is none."""
        try:
            return _etag(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _flush_sync(self, key: str) -> None:
        path, typed = self._object_path(key), self._type_path(key)
        try:
            if path.is_file():
                fsync_path(path)
            if typed.is_file():
                fsync_path(typed)
                fsync_path(typed.parent)
            fsync_path(path.parent)
        except FileNotFoundError:
            return  # deleted since: nothing of it to keep (any other OSError: _disk_errors on flush)

    @_disk_errors
    async def flush(self, key: str) -> None:
        validate_key(key)
        await asyncio.to_thread(self._flush_sync, key)

    @_disk_errors
    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        def copy(fh: BinaryIO) -> None:
            with path.open("rb") as source:
                shutil.copyfileobj(source, fh, 1 << 20)

        validate_key(key)
        await asyncio.to_thread(self._put_sync, key, copy, content_type)

    def _get_file_sync(self, key: str, target: Path) -> int:
        try:
            shutil.copyfile(self._object_path(key), target)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(key) from None
        return target.stat().st_size

    @_disk_errors
    async def get_file(self, key: str, path: Path) -> int:
        validate_key(key)
        return await asyncio.to_thread(self._get_file_sync, key, path)

    def _get_sync(self, key: str, max_bytes: int | None) -> StoredObject:
        path = self._object_path(key)
        try:
            with path.open("rb") as fh:
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(key) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLargeError(key, max_bytes, self._size_sync(key))
        return StoredObject(key=key, data=data, content_type=self._content_type(key), etag=_etag(data))

    @_disk_errors
    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        """As ObjectStore.get; an object up to INLINE_BYTES, or one that is not there, is read on the event loop."""
        validate_key(key)
        size = self._size_sync(key)
        if size is None:
            raise ObjectNotFoundError(key)
        if size <= INLINE_BYTES:
            return self._get_sync(key, max_bytes)
        return await asyncio.to_thread(self._get_sync, key, max_bytes)

    def _delete_sync(self, key: str, if_match: str | None) -> bool:
        path = self._object_path(key)
        if if_match is not None:
            with self._conditions_lock.open("a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._current_etag(path) != if_match:
                    raise PreconditionFailedError(key, f"If-Match: {if_match}")
                return self._unlink_object(key, path)
        return self._unlink_object(key, path)

    def _unlink_object(self, key: str, path: Path) -> bool:
        try:
            path.unlink()
            existed = True
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            existed = False
        self._type_path(key).unlink(missing_ok=True)
        self._remove_earlier_type(key)
        self._prune_empty_parents(path.parent, self._objects)
        return existed

    @staticmethod
    def _prune_empty_parents(directory: Path, stop: Path) -> None:
        while directory != stop and stop in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    @_disk_errors
    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """As ObjectStore.delete; a conditional one checks and deletes under the store's lock, as a conditional
        put does."""
        validate_key(key)
        return await asyncio.to_thread(self._delete_sync, key, if_match)

    @_disk_errors
    async def exists(self, key: str) -> bool:
        """A look-up of the file's name (on the event loop, as size)."""
        validate_key(key)
        return self._size_sync(key) is not None

    def _size_sync(self, key: str) -> int | None:
        try:
            found = self._object_path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return found.st_size if stat.S_ISREG(found.st_mode) else None

    @_disk_errors
    async def size(self, key: str) -> int | None:
        validate_key(key)
        return self._size_sync(key)

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        base = self._objects
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if not start.is_dir():
            return found
        for dirpath, _dirnames, filenames in os.walk(start):
            for filename in filenames:
                full = Path(dirpath) / filename
                key = full.relative_to(base).as_posix()
                if key.startswith(prefix):
                    try:
                        status = full.stat()
                    except FileNotFoundError:
                        continue  # deleted since the folder was read
                    modified = datetime.fromtimestamp(status.st_mtime, tz=UTC)
                    found.append(ObjectInfo(key=key, size=status.st_size, modified=modified))
        found.sort(key=lambda info: info.key)
        return found

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        try:
            found = await asyncio.to_thread(self._list_sync, prefix)
        except OSError as exc:
            raise StorageUnavailableError(f"the embedded store's disk failed listing {prefix!r}: {exc}") from exc
        for info in found:
            yield info

    def sign(self, key: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, key: str, expires: int, signature: str, now: float | None = None) -> bool:
        """True when the signature matches and has not expired (a signature is URL-safe base64: one that is not
        ASCII matches nothing, and hmac cannot compare it as text)."""
        if expires < (time.time() if now is None else now) or not signature.isascii():
            return False
        return hmac.compare_digest(self.sign(key, expires), signature)

    async def presigned_get_url(self, key: str, ttl_seconds: int) -> str:
        validate_key(key)
        expires = int(time.time()) + ttl_seconds
        query = urlencode({"expires": expires, "signature": self.sign(key, expires)})
        return f"{self._public_base_url}{FILES_ROUTE}{quote(key)}?{query}"

    async def close(self) -> None:
        """Let the reaper finish unlinking what writes set aside (a write after this unlinks its own)."""
        await asyncio.to_thread(self._reaper.shutdown, wait=True)

    async def ping(self) -> None:
        if not os.access(self._objects, os.W_OK):
            raise StorageUnavailableError(f"local storage directory {self._objects} is not writable")
