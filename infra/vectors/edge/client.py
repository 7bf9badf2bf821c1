"""The embedded index as seen by the server: a client of the engine process, which it starts and supervises.

The owner (the server process) starts the engine, talks to it over its Unix socket and restarts it if it dies
(calls in flight then fail with VectorIndexUnavailableError, which callers treat as transient, as does a call whose
restart fails: the next call starts another). `attach()` connects to an engine another process owns (how `ams-ops`
reaches a running server's index).

Every connection starts with a handshake: an engine that speaks another protocol version than this code (one
still running the code from before an upgrade, or one restarted from code changed on disk under its server) is
refused with EngineProtocolMismatchError, which names both versions and says to restart the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

import infra
from infra.vectors.base import (
    EmbeddingModelMismatchError,
    EngineProtocolMismatchError,
    ImageFilter,
    ImageRecord,
    IndexExistsError,
    IndexInUseError,
    IndexStats,
    ListingPosition,
    SnapshotInfo,
    VectorIndex,
    VectorIndexUnavailableError,
    record_of,
)
from infra.vectors.edge import protocol as p
from infra.vectors.edge.layout import EngineLayout
from infra.vectors.edge.migrate import LegacyLocalMode, import_legacy
from infra.vectors.listing import listing_page

log = structlog.get_logger(__name__)

START_TIMEOUT_SECONDS = 120.0
READ_TIMEOUT_SECONDS = 30.0
WRITE_TIMEOUT_SECONDS = 120.0
LONG_TIMEOUT_SECONDS = 24 * 3600.0
_RESTART_PAUSE_SECONDS = 1.0
_PROJECT = str(Path(infra.__file__).resolve().parent.parent)


def _vector_bytes(vector: Sequence[float]) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def upsert_operation(ids: list[str], vectors: Sequence[Sequence[float]], payloads: list[dict[str, Any]]) -> p.Upsert:
    block = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1) if ids else np.empty((0, 0), np.float32)
    return p.Upsert(ids, block.tobytes(), payloads)


class EdgeIndex(VectorIndex):
    engine = "qdrant-edge"
    supports_snapshots = True

    def __init__(
        self,
        layout: EngineLayout,
        *,
        owner: bool,
        db_path: Path,
        collection: str,
        build_points: int = 10000,
        log_level: str = "info",
        log_format: str = "json",
    ) -> None:
        self.layout = layout
        self._owner = owner
        self._db_path = db_path
        self._collection = collection
        self._build_points = build_points
        self._log_args = ["--log-level", log_level, "--log-format", log_format]
        self._process: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._send_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[p.Reply]] = {}
        self._ids = itertools.count(1)
        self._fresh = False
        self._closed = False
        self._last_start = 0.0
        self._refusal: str | None = None

    @classmethod
    async def open(
        cls,
        db_path: Path,
        collection: str,
        *,
        build_points: int = 10000,
        log_level: str = "info",
        log_format: str = "json",
    ) -> EdgeIndex:
        """Start the engine for this directory (this process becomes its owner)."""
        index = cls(
            EngineLayout.under(db_path, collection),
            owner=True,
            db_path=db_path,
            collection=collection,
            build_points=build_points,
            log_level=log_level,
            log_format=log_format,
        )
        hello = await index._start_engine()
        index._fresh = not hello.has_index and LegacyLocalMode.find(db_path, collection) is None
        return index

    @classmethod
    async def attach(cls, db_path: Path, collection: str) -> EdgeIndex | None:
        """Connect to the engine another process runs on this directory; None when none answers.

        Raises EngineProtocolMismatchError when that engine speaks another protocol version."""
        layout = EngineLayout.under(db_path, collection)
        index = cls(layout, owner=False, db_path=db_path, collection=collection)
        try:
            await index._connect()
        except VectorIndexUnavailableError:
            raise
        except (ConnectionError, FileNotFoundError):
            return None
        return index

    # ---- the engine process -----------------------------------------------------------------------------------

    async def _start_engine(self) -> p.Hello:
        self._last_start = time.monotonic()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PROJECT, os.environ.get("PYTHONPATH")]))}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "infra.vectors.edge.engine",
                "--root",
                str(self.layout.root),
                "--build-points",
                str(self._build_points),
                *self._log_args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:  # no process could be made (EAGAIN, ENOMEM): the next call tries again
            raise VectorIndexUnavailableError(f"the vector engine could not be started: {exc}") from exc
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise VectorIndexUnavailableError(
                f"the vector engine for {self.layout.root} did not start within {START_TIMEOUT_SECONDS:.0f} s"
            ) from None
        if not line:
            code = await process.wait()
            raise VectorIndexUnavailableError(
                f"the vector engine for {self.layout.root} exited with status {code} before it was ready "
                "(its log lines above say why)"
            )
        hello = msgspec.json.decode(line, type=p.Hello)
        if not hello.ready:
            await process.wait()
            if hello.kind == "in_use":
                raise IndexInUseError(
                    f"{hello.error}; run the API and the processor in one process (python -m launcher), or set "
                    "QDRANT_URL to a Qdrant server to run them separately"
                )
            raise VectorIndexUnavailableError(hello.error or "the vector engine could not start")
        self._process = process
        try:
            await self._connect()
        except EngineProtocolMismatchError as exc:
            # the code on disk is not this process's: every engine started from it would be refused alike
            await self._stop_process()
            self._refusal = str(exc)
            raise
        except VectorIndexUnavailableError:
            raise  # the handshake timed out: the next call stops this engine and starts another
        except OSError as exc:
            # it died, or dropped the connection, before the handshake ended: the next call starts another
            raise VectorIndexUnavailableError(
                f"the vector engine for {self.layout.root} stopped answering as it started: {exc}"
            ) from exc
        return hello

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.layout.socket_path))
        try:
            spoken = await self._handshake(reader, writer)
        except BaseException:
            writer.close()
            raise
        if spoken != p.PROTOCOL_VERSION:
            writer.close()
            raise EngineProtocolMismatchError(self._mismatch(spoken))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_replies(reader, writer), name="vector-engine-replies")

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        """The protocol version the engine speaks: 0 for an engine from before versions."""
        reply = await self._ask(reader, writer, p.Handshake(p.PROTOCOL_VERSION))
        if reply is not None:
            if reply.error is not None:
                raise _translated(reply.error)
            return msgspec.convert(reply.result, p.Greeting).protocol
        # An engine from before versions drops a connection on an op it does not know; one that then answers an op
        # it has always known, on a connection of its own, is such an engine (else it went away meanwhile).
        reader, writer = await asyncio.open_unix_connection(str(self.layout.socket_path))
        try:
            if await self._ask(reader, writer, p.Count()) is None:
                raise ConnectionResetError("the vector engine closed the connection")
        finally:
            writer.close()
        return 0

    async def _ask(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, op: p.Operation) -> p.Reply | None:
        """One request and its reply, on a connection no reader task serves; None when the engine closes it instead."""
        try:
            writer.write(p.frame(p.Request(next(self._ids), op)))
            await writer.drain()
            return await asyncio.wait_for(p.read_reply(reader), READ_TIMEOUT_SECONDS)
        except (ConnectionError, asyncio.IncompleteReadError):
            return None
        except TimeoutError:
            raise VectorIndexUnavailableError(
                f"the vector engine did not answer within {READ_TIMEOUT_SECONDS:.0f} s"
            ) from None

    def _mismatch(self, spoken: int) -> str:
        theirs = f"{spoken} (from before the protocol had versions)" if spoken == 0 else str(spoken)
        if self._owner:
            return (
                f"the vector engine started for the embedded index at {self.layout.root} speaks index protocol "
                f"{theirs}, this server speaks index protocol {p.PROTOCOL_VERSION}: the code on disk was changed "
                "while the server ran; restart the server"
            )
        return (
            f"the vector engine running the embedded index at {self.layout.root} speaks index protocol {theirs}, "
            f"this code speaks index protocol {p.PROTOCOL_VERSION}: the code was changed while that engine ran; "
            "restart the server that owns the index (its engine then runs the code installed now)"
        )

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (reply := await p.read_reply(reader)) is not None:
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ConnectionError, ValueError, msgspec.DecodeError) as exc:
            log.warning("vector_engine_connection_lost", error=str(exc))
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            failure = VectorIndexUnavailableError("the vector engine stopped answering; it is being restarted")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)
            self._pending.clear()

    async def _ensure_engine(self) -> asyncio.StreamWriter:
        if self._closed:
            raise VectorIndexUnavailableError("the vector index is closed")
        writer = self._writer
        if writer is not None and not writer.is_closing():
            return writer
        if not self._owner:
            raise VectorIndexUnavailableError("the vector engine of the running server went away")
        async with self._start_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            if self._refusal is not None:
                raise EngineProtocolMismatchError(self._refusal)
            await self._stop_process()
            wait = self._last_start + _RESTART_PAUSE_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            log.warning("vector_engine_restarting", path=str(self.layout.root))
            await self._start_engine()
            assert self._writer is not None
            return self._writer

    async def _stop_process(self) -> None:
        process = self._process
        self._process = None
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _call(self, op: p.Operation, wait_seconds: float = READ_TIMEOUT_SECONDS) -> Any:
        writer = await self._ensure_engine()
        request_id = next(self._ids)
        future: asyncio.Future[p.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._send_lock:
                writer.write(p.frame(p.Request(request_id, op)))
                await writer.drain()
            reply = await asyncio.wait_for(future, wait_seconds)
        except TimeoutError:
            raise VectorIndexUnavailableError(f"the vector engine did not answer within {wait_seconds:.0f} s") from None
        except ConnectionError as exc:
            raise VectorIndexUnavailableError(f"the vector engine is unreachable: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
        if reply.error is not None:
            raise _translated(reply.error)
        return reply.result

    # ---- the VectorIndex interface ----------------------------------------------------------------------------

    @property
    def engine_pid(self) -> int | None:
        """The engine process this object started (None when attached to another process's engine)."""
        return self._process.pid if self._process is not None else None

    @property
    def fresh(self) -> bool:
        return self._fresh

    async def revision(self) -> str:
        """The engine's own count of writes (by any client), with the identity of the engine process."""
        described = await self._call(p.Describe())
        return f"{described['engine_id']}:{described['revision']}"

    async def ensure_collection(self, model_id: str, dim: int) -> None:
        legacy = LegacyLocalMode.find(self._db_path, self._collection)
        if legacy is not None:
            await self._migrate(legacy, model_id, dim)
        await self._call(p.Create(model_id, dim), WRITE_TIMEOUT_SECONDS)
        self._fresh = False

    async def _migrate(self, legacy: LegacyLocalMode, model_id: str, dim: int) -> None:
        described = await self._call(p.Describe())
        if described.get("migrated_from") != str(legacy.db_path):

            async def create() -> None:
                await self._call(p.Create(model_id, dim), WRITE_TIMEOUT_SECONDS)

            async def sink(batch: p.Upsert) -> None:
                if batch.ids:
                    await self._call(batch, WRITE_TIMEOUT_SECONDS)

            await import_legacy(legacy, model_id, dim, create=create, sink=sink)
            await self._call(p.MarkMigrated(str(legacy.db_path)), WRITE_TIMEOUT_SECONDS)
        moved_to = await asyncio.to_thread(legacy.move_aside)
        log.info("index_migration_finished", old_files=str(moved_to))

    async def upsert(self, items: Sequence[tuple[ImageRecord, Sequence[float]]]) -> None:
        operation = upsert_operation(
            [record.id for record, _ in items],
            [vector for _, vector in items],
            [msgspec.to_builtins(record) for record, _ in items],
        )
        await self._call(operation, WRITE_TIMEOUT_SECONDS)

    async def search(
        self, vector: Sequence[float], limit: int, image_filter: ImageFilter | None = None
    ) -> list[tuple[ImageRecord, float]]:
        found = await self._call(p.Search(_vector_bytes(vector), limit, _wire(image_filter)))
        return [(record_of(payload), float(score)) for payload, score in found]

    async def get_many(self, image_ids: Sequence[str]) -> dict[str, ImageRecord]:
        records = [record_of(payload) for payload in await self._call(p.Retrieve(list(image_ids)))]
        return {record.id: record for record in records}

    async def vector(self, image_id: str) -> list[float] | None:
        found = await self._call(p.Vector(image_id))
        return None if found is None else np.frombuffer(found, dtype=np.float32).tolist()

    async def delete(self, image_id: str) -> None:
        await self._call(p.Delete([image_id]), WRITE_TIMEOUT_SECONDS)

    async def newest(
        self, limit: int, after: ListingPosition | None = None, image_filter: ImageFilter | None = None
    ) -> list[ImageRecord]:
        return await listing_page(
            limit, after, image_filter, newest_first=self._newest_first, in_id_order=self._in_id_order
        )

    async def _newest_first(self, limit: int, image_filter: ImageFilter) -> list[ImageRecord]:
        return [record_of(payload) for payload in await self._call(p.Newest(limit, _wire(image_filter)))]

    async def _in_id_order(self, limit: int, start_id: str | None, image_filter: ImageFilter) -> list[ImageRecord]:
        found = await self._call(p.InIdOrder(limit, start_id, _wire(image_filter)))
        return [record_of(payload) for payload in found]

    async def count(self, image_filter: ImageFilter | None = None) -> int:
        return int(await self._call(p.Count(_wire(image_filter))))

    async def ping(self) -> None:
        await self._call(p.Count(), READ_TIMEOUT_SECONDS)

    async def stats(self) -> IndexStats:
        described = await self._call(p.Describe())
        return IndexStats(
            engine=self.engine,
            location=described["path"],
            model_id=described["model_id"],
            dim=described["dim"],
            points=described["points"],
            indexed_points=described["indexed_points"],
            segments=described["segments"],
            disk_bytes=described["disk_bytes"],
            building=described["building"],
            last_build=described["last_build"],
        )

    async def build_graph(self, *, wait: bool = False) -> dict[str, Any] | None:
        return await self._call(p.Build(wait), LONG_TIMEOUT_SECONDS if wait else WRITE_TIMEOUT_SECONDS)

    def scratch_dir(self) -> Path:
        return self.layout.scratch

    async def snapshot(self) -> SnapshotInfo:
        return msgspec.convert(await self._call(p.Snapshot(), LONG_TIMEOUT_SECONDS), SnapshotInfo)

    async def install(self, source: Path, *, model_id: str, dim: int, replace: bool = False) -> None:
        await self._call(p.Install(str(source), model_id, dim, replace), LONG_TIMEOUT_SECONDS)
        self._fresh = False

    async def close(self) -> None:
        if self._closed:
            return
        if self._owner and self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(VectorIndexUnavailableError):
                await self._call(p.Shutdown(), 5)
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._owner:
            await self._stop_process()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)


def _wire(image_filter: ImageFilter | None) -> ImageFilter | None:
    return None if image_filter is None or image_filter.is_empty else image_filter


def _translated(failure: p.Failure) -> Exception:
    if failure.kind == "mismatch":
        return EmbeddingModelMismatchError(failure.message)
    if failure.kind == "exists":
        return IndexExistsError(failure.message)
    if failure.kind in ("invalid", "no_index"):
        return ValueError(failure.message)
    return VectorIndexUnavailableError(failure.message)
