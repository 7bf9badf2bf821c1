"""Where the embedded index keeps its files.

<IMAGE_SEARCH_DB_PATH>/edge/<collection>/
    index.json       which shard directory is live, and the embedding model it was built with
    shard-000001/    the live Qdrant Edge shard (segments, WAL, payload indexes)
    shard-000002/    a graph build in progress (or left by a crash: removed at start)
    scratch/         snapshot copies and restores being staged
    engine.lock      held by the engine process that owns the directory
    engine.sock      the engine's Unix socket
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from infra.disk import fsync_path

META_FORMAT = "ams-edge-index/1"
_SHARD_NAME = re.compile(r"^shard-(\d{6})$")
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


class IndexMeta(msgspec.Struct, kw_only=True):
    format: str = META_FORMAT
    model_id: str
    dim: int
    shard: str
    created_at: str
    migrated_from: str | None = None


@dataclass(frozen=True, slots=True)
class EngineLayout:
    root: Path

    @classmethod
    def under(cls, db_path: Path, collection: str) -> EngineLayout:
        return cls(db_path.absolute() / "edge" / collection)

    @property
    def meta_path(self) -> Path:
        return self.root / "index.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "engine.lock"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def socket_path(self) -> Path:
        """engine.sock in the directory, or (for a path too long for a Unix socket) a name made from the directory's
        path in the temp dir, or in /tmp when the temp dir's path is long too (TMPDIR set deep)."""
        path = self.root / "engine.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
        name = f"ams-index-{hashlib.sha256(os.fsencode(self.root)).hexdigest()[:20]}.sock"
        path = Path(tempfile.gettempdir()) / name
        return path if len(os.fsencode(path)) <= _MAX_SOCKET_PATH else Path("/tmp") / name

    def shard_path(self, name: str) -> Path:
        return self.root / name

    def read_meta(self) -> IndexMeta | None:
        try:
            data = self.meta_path.read_bytes()
        except FileNotFoundError:
            return None
        return msgspec.json.decode(data, type=IndexMeta)

    def write_meta(self, meta: IndexMeta) -> None:
        """Atomically: a crash leaves the old file or the new one."""
        tmp = self.meta_path.with_suffix(".json.tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(msgspec.to_builtins(meta), indent=2).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.meta_path)
        fsync_path(self.root)

    def shard_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if _SHARD_NAME.match(entry.name))


def next_shard_name(current: str | None) -> str:
    number = int(_SHARD_NAME.match(current).group(1)) if current and _SHARD_NAME.match(current) else 0
    return f"shard-{number + 1:06d}"


def directory_bytes(path: Path) -> int:
    """Bytes the files take on disk (Edge preallocates sparse files, whose apparent size means little)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
