"""Backups of the embedded index to the object store (IMAGE_SEARCH_DB_BACKUP_*), and restores from them.

A backup is a consistent copy of the shard (taken by the engine with writes paused for the moment of a local
copy; searches go on), packed as `<IMAGE_SEARCH_DB_R2_KEY>.<UTC time>.tar.gz`: the shard's files under `shard/`
and a `manifest.json` (format, embedding model, point count, size and SHA-256 of every file). The newest
IMAGE_SEARCH_DB_BACKUP_GENERATIONS are kept. A restore checks every file against the manifest before it
replaces anything, so a damaged backup is an error, never an empty or partial index.

Backups made before the embedded engine (one msgpack object at exactly IMAGE_SEARCH_DB_R2_KEY, every point
with its vector) are still restored into a new index when no newer backup exists, and deleted once a new one is
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec
import numpy as np
import structlog

from infra.storage import ObjectStore, StorageError, StorageUnavailableError
from infra.vectors.base import ImageRecord, SnapshotInfo, VectorIndex, record_of

if TYPE_CHECKING:
    from infra.settings import Settings

log = structlog.get_logger(__name__)

ARCHIVE_FORMAT = "ams-edge-index-backup/1"
CONTENT_TYPE = "application/gzip"
LEGACY_FORMAT = "ams-index-snapshot/1"
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


def archive_prefix(key: str) -> str:
    """What the keys of the backups under `key` (IMAGE_SEARCH_DB_R2_KEY) begin with, the only objects this server
    uploads in parts."""
    return f"{key}."


class IndexBackupError(RuntimeError):
    """A backup could not be made or restored; the message names the object and what to do."""


@dataclass(frozen=True, slots=True)
class BackupInfo:
    key: str
    size: int
    taken_at: str | None  # None for a backup in the old single-object format

    @property
    def legacy(self) -> bool:
        return self.taken_at is None


@dataclass(frozen=True, slots=True)
class RestoreReport:
    key: str
    points: int
    model_id: str


class _LegacyPoint(msgspec.Struct):
    id: str
    vector: bytes
    payload: dict[str, Any]


class _LegacySnapshot(msgspec.Struct, kw_only=True):
    format: str
    model_id: str
    created_at: str
    points: list[_LegacyPoint]


# ---- archives (synchronous: run in a worker thread) -----------------------------------------------------------


class _Hashing(io.RawIOBase):
    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.sha256.update(data)
        return data


def write_archive(snapshot: SnapshotInfo, target: Path) -> int:
    """Pack a snapshot directory; returns the archive's size in bytes."""
    root = Path(snapshot.path)
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(target, "w:gz", compresslevel=1) as tar:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), f"shard/{relative}")
            if info.isdir():
                tar.addfile(info)
            elif info.isfile():
                with path.open("rb") as fh:
                    hashing = _Hashing(fh)
                    tar.addfile(info, hashing)
                files[relative] = {"size": info.size, "sha256": hashing.sha256.hexdigest()}
        manifest = json.dumps(
            {
                "format": ARCHIVE_FORMAT,
                "model_id": snapshot.model_id,
                "dim": snapshot.dim,
                "points": snapshot.points,
                "taken_at": snapshot.created_at,
                "files": files,
            }
        ).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mtime = len(manifest), int(time.time())
        tar.addfile(info, io.BytesIO(manifest))
    return target.stat().st_size


def _copy_sparse(source: IO[bytes], target: Path) -> tuple[int, str]:
    """Copy, leaving holes where the data is zeros (Edge's files are mostly preallocated space)."""
    digest, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if chunk == _ZEROS[: len(chunk)]:
                out.seek(len(chunk), io.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(size)
    return size, digest.hexdigest()


def read_archive(archive: Path, target: Path, key: str) -> dict[str, Any]:
    """Unpack into `target`/shard and check every file against the manifest; returns the manifest."""
    seen: dict[str, dict[str, Any]] = {}
    manifest: dict[str, Any] | None = None
    shard = target / "shard"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name == "manifest.json" and member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    manifest = json.loads(extracted.read())
                    continue
                relative = member.name.removeprefix("shard/")
                parts = relative.split("/")
                if not member.name.startswith("shard/") or relative.startswith("/") or ".." in parts:
                    raise IndexBackupError(f"index backup {key!r} holds an unexpected entry {member.name!r}")
                destination = shard.joinpath(*parts)
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    size, sha256 = _copy_sparse(extracted, destination)
                    seen[relative] = {"size": size, "sha256": sha256}
                else:
                    raise IndexBackupError(f"index backup {key!r} holds {member.name!r}, which is not a regular file")
    except (tarfile.TarError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexBackupError(f"index backup {key!r} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if manifest is None or manifest.get("format") != ARCHIVE_FORMAT:
        raise IndexBackupError(f"index backup {key!r} has no {ARCHIVE_FORMAT} manifest")
    if manifest.get("files") != seen:
        damaged = sorted(
            name for name in set(seen) | set(manifest.get("files", {})) if seen.get(name) != manifest["files"].get(name)
        )
        raise IndexBackupError(
            f"index backup {key!r} is damaged: {len(damaged)} file(s) differ from its manifest (e.g. {damaged[0]})"
        )
    return manifest


# ---- backups in the object store ------------------------------------------------------------------------------


class IndexBackups:
    """The backups of one index under one key; `model_id`, when given, is checked before a restore."""

    def __init__(
        self, index: VectorIndex, store: ObjectStore, key: str, *, generations: int, model_id: str | None = None
    ) -> None:
        self._index = index
        self._store = store
        self.key = key
        self._generations = generations
        self._model_id = model_id
        self._pattern = re.compile(rf"^{re.escape(key)}\.(\d{{8}}T\d{{12}}Z)\.tar\.gz$")
        self._saved_revision: str | None = None

    async def changed(self) -> bool:
        """Whether the index changed (through any process using it) since the last backup or restore, or since
        `assume_saved`; True before any of them."""
        return await self._index.revision() != self._saved_revision

    async def assume_saved(self) -> None:
        """Count the index as it is now as backed up: at start-up, an index that was backed up when it last
        stopped."""
        self._saved_revision = await self._index.revision()

    async def list(self) -> list[BackupInfo]:
        """Newest first; a backup in the old format (if any) last."""
        found: list[BackupInfo] = []
        legacy: BackupInfo | None = None
        async for info in self._store.list(self.key):
            if info.key == self.key:
                legacy = BackupInfo(info.key, info.size, None)
            elif match := self._pattern.match(info.key):
                taken = datetime.strptime(match.group(1), _STAMP_FORMAT).replace(tzinfo=UTC)
                found.append(BackupInfo(info.key, info.size, taken.isoformat().replace("+00:00", "Z")))
        found.sort(key=lambda backup: backup.key, reverse=True)
        return found + ([legacy] if legacy else [])

    async def save(self) -> BackupInfo:
        """Back the index up now; then keep only the newest generations."""
        revision = await self._index.revision()
        snapshot = await self._index.snapshot()
        archive = Path(f"{snapshot.path}.tar.gz")
        try:
            started = time.monotonic()
            size = await asyncio.to_thread(write_archive, snapshot, archive)
            taken = datetime.fromisoformat(snapshot.created_at.replace("Z", "+00:00"))
            key = f"{self.key}.{taken.strftime(_STAMP_FORMAT)}.tar.gz"
            await self._store.put_file(key, archive, CONTENT_TYPE)
        finally:
            await asyncio.to_thread(shutil.rmtree, snapshot.path, True)
            await asyncio.to_thread(archive.unlink, True)
        self._saved_revision = revision
        log.info(
            "index_backed_up",
            key=key,
            points=snapshot.points,
            bytes=size,
            seconds=round(time.monotonic() - started, 2),
        )
        await self._prune()
        return BackupInfo(key, size, snapshot.created_at)

    async def _prune(self) -> None:
        backups = await self.list()
        for old in [backup for backup in backups if not backup.legacy][self._generations :] + [
            backup for backup in backups if backup.legacy
        ]:
            await self._store.delete(old.key)
            log.info("index_backup_removed", key=old.key, reason="beyond IMAGE_SEARCH_DB_BACKUP_GENERATIONS")

    async def restore(self, key: str | None = None, *, replace: bool = False) -> RestoreReport | None:
        """Restore the newest backup (or `key`); None when there is none. Replaces an existing index only
        with `replace`. Raises IndexBackupError when the backup is unusable, StorageUnavailableError when the store
        did not answer (nothing replaced: try again)."""
        backups = await self.list()
        if key is None:
            if not backups:
                return None
            chosen = backups[0]
        else:
            matching = [backup for backup in backups if backup.key == key]
            if not matching:
                raise IndexBackupError(f"no index backup at {key!r} (see `ams-ops index stats` for the list)")
            chosen = matching[0]
        try:
            if chosen.legacy:
                report = await self._restore_legacy(chosen.key)
            else:
                report = await self._restore_archive(chosen.key, replace=replace)
        except IndexBackupError as exc:
            older = [backup.key for backup in backups if backup.key != chosen.key]
            hint = (
                f"; restore an older one with `ams-ops index restore --key {older[0]}`, or delete this one"
                if older
                else "; delete it to start with an empty index"
            )
            raise IndexBackupError(f"{exc}{hint}") from exc
        log.info("index_restored", key=report.key, points=report.points, model=report.model_id)
        self._saved_revision = await self._index.revision()
        return report

    def _check_model(self, key: str, model_id: str) -> None:
        if self._model_id is not None and model_id != self._model_id:
            raise IndexBackupError(
                f"index backup {key!r} was made with embedding model {model_id!r} but the server is configured with "
                f"{self._model_id!r}"
            )

    async def _restore_archive(self, key: str, *, replace: bool) -> RestoreReport:
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="restore-", dir=self._index.scratch_dir()))
        try:
            archive = staging / "backup.tar.gz"
            try:
                await self._store.get_file(key, archive)
            except StorageUnavailableError:
                raise  # the store did not answer: the backup may be sound, and a later try may read it
            except StorageError as exc:
                raise IndexBackupError(f"index backup {key!r} could not be read: {exc}") from exc
            manifest = await asyncio.to_thread(read_archive, archive, staging / "files", key)
            archive.unlink()
            self._check_model(key, manifest["model_id"])
            await self._index.install(
                staging / "files" / "shard", model_id=manifest["model_id"], dim=manifest["dim"], replace=replace
            )
            points = await self._index.count()
            if points != manifest["points"]:
                raise IndexBackupError(
                    f"index backup {key!r} restored {points} points where its manifest says {manifest['points']}"
                )
            return RestoreReport(key, points, manifest["model_id"])
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _restore_legacy(self, key: str) -> RestoreReport:
        if not self._index.fresh:
            raise IndexBackupError(f"{key!r} is an old-format backup: it can only be restored into a new index")
        try:
            stored = await self._store.get(key)
        except StorageUnavailableError:
            raise
        except StorageError as exc:
            raise IndexBackupError(f"index backup {key!r} could not be read: {exc}") from exc
        try:
            snapshot = msgspec.msgpack.decode(stored.data, type=_LegacySnapshot)
            if snapshot.format != LEGACY_FORMAT:
                raise ValueError(f"format {snapshot.format!r}")
            points = [
                (record_of(point.payload), np.frombuffer(point.vector, dtype=np.float32)) for point in snapshot.points
            ]
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise IndexBackupError(f"index backup {key!r} is corrupt ({exc})") from exc
        self._check_model(key, snapshot.model_id)
        dim = len(points[0][1]) if points else 0
        if points:
            await self._index.ensure_collection(snapshot.model_id, dim)
            for start in range(0, len(points), 512):
                page: list[tuple[ImageRecord, Any]] = points[start : start + 512]
                await self._index.upsert(page)
        return RestoreReport(key, len(points), snapshot.model_id)


class BackupSchedule:
    """Back up every `interval` seconds when the index changed, and once more at stop."""

    def __init__(self, backups: IndexBackups, interval_seconds: int) -> None:
        self._backups = backups
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="index-backup")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._save_if_changed()

    async def _save_if_changed(self) -> None:
        try:
            if not await self._backups.changed():
                return
            await self._backups.save()
        except Exception:
            log.exception("index_backup_failed", key=self._backups.key)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._save_if_changed()


def automatic_backups(
    settings: Settings, index: VectorIndex, store: ObjectStore, model_id: str | None
) -> IndexBackups | None:
    """The backups the server takes by itself: IMAGE_SEARCH_DB_BACKUP_ENABLED=1, objects in R2, and an index
    that lives here (a Qdrant server keeps its own data)."""
    if not (settings.image_search_db_backup_enabled and settings.r2_enabled and index.supports_snapshots):
        return None
    return IndexBackups(
        index,
        store,
        settings.image_search_db_r2_key,
        generations=settings.image_search_db_backup_generations,
        model_id=model_id,
    )
