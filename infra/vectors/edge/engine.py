"""`python -m infra.vectors.edge.engine`: the process that owns an embedded index directory.

It holds `engine.lock`, opens the live shard, serves requests from any number of clients on a Unix socket
(the server that started it, and `ams-ops`), and keeps the HNSW graph built: when enough points wait outside
the graph it copies the shard (writes paused, reads go on), builds the copy in a low-priority child process,
then loads the built copy, replays the writes made meanwhile and swaps it in. It stops when its parent closes
its stdin (or dies), flushing first.

Reads run one at a time on this process's event loop (Edge holds the GIL through each call anyway); writes are
applied in arrival order under one lock, which snapshots also take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog
from qdrant_edge import (
    CountRequest,
    Direction,
    EdgeShard,
    OrderBy,
    Point,
    Query,
    QueryRequest,
    ScrollRequest,
    UpdateOperation,
)

from infra.logging import configure_logging
from infra.vectors.base import FIELD_CREATED
from infra.vectors.edge import protocol as p
from infra.vectors.edge.layout import EngineLayout, IndexMeta, directory_bytes, next_shard_name
from infra.vectors.edge.shard import create_shard, edge_filter, load_shard, smallest_build

log = structlog.get_logger("vector-engine")

EXIT_IN_USE = 3
IDLE_BUILD_SECONDS = 60.0
FLUSH_EVERY_SECONDS = 30.0
FAILED_BUILD_BACKOFF_SECONDS = 300.0
_TICK_SECONDS = 1.0
HANDOVER_SECONDS = 60.0
_HANDOVER_POLL_SECONDS = 0.05


class EngineError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Build:
    name: str
    reason: str
    started: float
    points_at_start: int
    copy_seconds: float = 0.0
    cancelled: bool = False
    oplog: list[UpdateOperation] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    def __init__(self, layout: EngineLayout, build_points: int) -> None:
        self.layout = layout
        self.build_points = build_points
        self.meta: IndexMeta | None = None
        self.shard: EdgeShard | None = None
        self.write_lock = asyncio.Lock()
        self.build: _Build | None = None
        self.last_build: dict[str, Any] | None = None
        self.revision = 0  # every write, by any client; with engine_id, tells a backup whether the index changed
        self.engine_id = uuid.uuid4().hex  # a restarted engine counts from 0 again
        self.last_write = time.monotonic()
        self.last_flush = time.monotonic()
        self.unflushed = False
        self.backoff_until = 0.0
        self.points_written = 0
        self.points_written_at_last_build: int | None = None
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- start and stop -------------------------------------------------------------------------------------

    def open(self) -> None:
        self.meta = self.layout.read_meta()
        for name in self.layout.shard_names():
            if self.meta is None or name != self.meta.shard:
                log.info("index_leftover_removed", directory=name)
                shutil.rmtree(self.layout.shard_path(name))
        shutil.rmtree(self.layout.scratch, ignore_errors=True)
        self.layout.scratch.mkdir(parents=True)
        if self.meta is not None:
            started = time.monotonic()
            self.shard = load_shard(self.layout.shard_path(self.meta.shard))
            info = self.shard.info()
            log.info(
                "index_opened",
                path=str(self.layout.root),
                points=info.points_count,
                indexed_points=info.indexed_vectors_count,
                seconds=round(time.monotonic() - started, 3),
            )

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.build is not None and self.build.process is not None and self.build.process.returncode is None:
            self.build.process.kill()
            await self.build.process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None
        log.info("index_closed", path=str(self.layout.root))

    # ---- dispatch ---------------------------------------------------------------------------------------------

    async def handle(self, op: p.Operation) -> Any:
        match op:
            case p.Handshake():
                if op.protocol != p.PROTOCOL_VERSION:
                    log.warning("index_client_of_another_protocol", client=op.protocol, engine=p.PROTOCOL_VERSION)
                return p.Greeting(p.PROTOCOL_VERSION)
            case p.Search():
                return self._search(op)
            case p.Retrieve():
                return self._retrieve(op.ids)
            case p.Vector():
                return self._vector(op.id)
            case p.Newest():
                return self._newest(op)
            case p.InIdOrder():
                return self._in_id_order(op)
            case p.Count():
                if op.filter is None:  # the shard keeps this number; an exact count scans (4 ms at 50k points)
                    return self._live().info().points_count
                return self._live().count(CountRequest(exact=True, filter=edge_filter(op.filter)))
            case p.Describe():
                return self._describe()
            case p.Upsert():
                rows = np.frombuffer(op.vectors, dtype=np.float32).reshape(len(op.ids), -1).tolist()
                points = [
                    Point(id=point_id, vector=row, payload=payload)
                    for point_id, row, payload in zip(op.ids, rows, op.payloads, strict=True)
                ]
                await self._write(UpdateOperation.upsert_points(points), len(points))
                return None
            case p.Delete():
                await self._write(UpdateOperation.delete_points(list(op.ids)), 0)
                return None
            case p.Create():
                return await self._create(op)
            case p.Snapshot():
                return await self._snapshot()
            case p.Install():
                return await self._install(op)
            case p.MarkMigrated():
                return await self._mark_migrated(op.source)
            case p.Build():
                return await self._build_now(op.wait)
            case p.Shutdown():
                self.stopping.set()
                return None
        raise EngineError("invalid", f"unknown operation {op!r}")

    def _live(self) -> EdgeShard:
        if self.shard is None:
            raise EngineError("no_index", "the index does not exist yet (create it first)")
        return self.shard

    # ---- reads ------------------------------------------------------------------------------------------------

    def _search(self, op: p.Search) -> list[tuple[dict[str, Any], float]]:
        found = self._live().query(
            QueryRequest(
                limit=op.limit,
                query=Query.Nearest(np.frombuffer(op.vector, dtype=np.float32).tolist()),
                filter=edge_filter(op.filter),
                with_payload=True,
            )
        )
        return [(point.payload or {}, float(point.score)) for point in found]

    def _retrieve(self, ids: list[str]) -> list[dict[str, Any]]:
        return [record.payload or {} for record in self._live().retrieve(list(ids), True, False)]

    def _vector(self, point_id: str) -> bytes | None:
        found = self._live().retrieve([point_id], False, True)
        if not found or not isinstance(found[0].vector, list):
            return None
        return np.asarray(found[0].vector, dtype=np.float32).tobytes()

    def _newest(self, op: p.Newest) -> list[dict[str, Any]]:
        records, _ = self._live().scroll(
            ScrollRequest(
                limit=op.limit,
                filter=edge_filter(op.filter),
                with_payload=True,
                order_by=OrderBy(FIELD_CREATED, direction=Direction.Desc),
            )
        )
        return [record.payload or {} for record in records]

    def _in_id_order(self, op: p.InIdOrder) -> list[dict[str, Any]]:
        records, _ = self._live().scroll(
            ScrollRequest(limit=op.limit, offset=op.start_id, filter=edge_filter(op.filter), with_payload=True)
        )
        return [record.payload or {} for record in records]

    def _describe(self) -> dict[str, Any]:
        info = self.shard.info() if self.shard is not None else None
        return {
            "path": str(self.layout.root),
            "model_id": self.meta.model_id if self.meta else None,
            "dim": self.meta.dim if self.meta else None,
            "migrated_from": self.meta.migrated_from if self.meta else None,
            "points": info.points_count if info else 0,
            "indexed_points": info.indexed_vectors_count if info else 0,
            "segments": info.segments_count if info else 0,
            "disk_bytes": directory_bytes(self.layout.shard_path(self.meta.shard)) if self.meta else 0,
            "building": self.build is not None,
            "last_build": self.last_build,
            "revision": self.revision,
            "engine_id": self.engine_id,
            "build_points": self.build_points,
        }

    # ---- writes -----------------------------------------------------------------------------------------------

    async def _write(self, operation: UpdateOperation, points: int) -> None:
        async with self.write_lock:
            self._live().update(operation)
            if self.build is not None:
                self.build.oplog.append(operation)
            self.revision += 1
            self.points_written += points
            self.last_write = time.monotonic()
            self.unflushed = True

    async def _create(self, op: p.Create) -> dict[str, Any]:
        async with self.write_lock:
            if self.meta is not None:
                if (self.meta.model_id, self.meta.dim) != (op.model_id, op.dim):
                    raise EngineError(
                        "mismatch",
                        f"the embedded index at {self.layout.root} was built with embedding model "
                        f"{self.meta.model_id!r} ({self.meta.dim} dimensions) but the server is configured with "
                        f"{op.model_id!r} ({op.dim} dimensions); set CLIP_MODEL/CLIP_PRETRAINED back, or use "
                        "another IMAGE_SEARCH_DB_PATH (or QDRANT_COLLECTION) and re-index",
                    )
                return {"created": False}
            name = next_shard_name(None)
            shard = create_shard(self.layout.shard_path(name), op.dim, self.build_points)
            shard.flush()
            self.meta = IndexMeta(model_id=op.model_id, dim=op.dim, shard=name, created_at=_now())
            self.layout.write_meta(self.meta)
            self.shard = shard
            log.info("index_created", path=str(self.layout.root), model=op.model_id, dim=op.dim)
            return {"created": True}

    async def _mark_migrated(self, source: str) -> None:
        async with self.write_lock:
            self._live().flush()
            assert self.meta is not None
            self.meta = msgspec.structs.replace(self.meta, migrated_from=source)
            self.layout.write_meta(self.meta)

    async def _copy_live(self, target: Path) -> None:
        """A consistent copy of the live shard; the caller holds the write lock (reads go on meanwhile)."""
        shard = self._live()
        shard.flush()
        self.last_flush, self.unflushed = time.monotonic(), False
        assert self.meta is not None
        await copy_tree(self.layout.shard_path(self.meta.shard), target)

    async def _snapshot(self) -> dict[str, Any]:
        target = self.layout.scratch / f"snapshot-{uuid.uuid4().hex}"
        async with self.write_lock:
            started = time.monotonic()
            await self._copy_live(target)
            points = self._live().count(CountRequest(exact=True))
            paused = time.monotonic() - started
        assert self.meta is not None
        log.info("index_snapshot_taken", points=points, writes_paused_seconds=round(paused, 3))
        return {
            "path": str(target),
            "model_id": self.meta.model_id,
            "dim": self.meta.dim,
            "points": points,
            "created_at": _now(),
        }

    async def _install(self, op: p.Install) -> dict[str, Any]:
        source = Path(op.source)
        if not await asyncio.to_thread(source.is_dir):
            raise EngineError("invalid", f"no index files at {source}")
        await self._cancel_build()
        async with self.write_lock:
            if self.meta is not None and not op.replace:
                raise EngineError("exists", f"an index already exists at {self.layout.root}")
            name = next_shard_name(self.meta.shard if self.meta else None)
            target = self.layout.shard_path(name)
            await asyncio.to_thread(shutil.move, str(source), str(target))
            try:
                shard = load_shard(target)
                points = shard.count(CountRequest(exact=True))
            except Exception as exc:
                shutil.rmtree(target, ignore_errors=True)
                raise EngineError("invalid", f"the restored files are not a usable index: {exc}") from exc
            old_meta, old_shard = self.meta, self.shard
            self.meta = IndexMeta(model_id=op.model_id, dim=op.dim, shard=name, created_at=_now())
            self.layout.write_meta(self.meta)
            self.shard = shard
            self.revision += 1
            if old_shard is not None and old_meta is not None:
                old_shard.close()
                await asyncio.to_thread(shutil.rmtree, self.layout.shard_path(old_meta.shard), True)
        log.info("index_installed", points=points, replaced=old_meta is not None)
        self._consider_build(idle=False)
        return {"points": points}

    # ---- graph builds -----------------------------------------------------------------------------------------

    def _consider_build(self, *, idle: bool) -> None:
        if self.build_points <= 0 or self.build is not None or self.shard is None or self.stopping.is_set():
            return
        if time.monotonic() < self.backoff_until:
            return
        written_since = (
            None
            if self.points_written_at_last_build is None
            else self.points_written - self.points_written_at_last_build
        )
        if written_since is not None and written_since < smallest_build(self.build_points):
            return  # the last build left these points out of the graph; wait for more
        info = self.shard.info()
        waiting = info.points_count - info.indexed_vectors_count
        if waiting >= max(self.build_points, info.indexed_vectors_count // 10):
            self.spawn(self._run_build("points waiting"))
        elif idle and waiting >= smallest_build(self.build_points):
            self.spawn(self._run_build("idle"))

    async def _build_now(self, wait: bool) -> dict[str, Any] | None:
        if self.build is None:
            self._live()
            self.spawn(self._run_build("requested"))
            await asyncio.sleep(0)
        if wait:
            while self.build is not None:
                await self.build.done.wait()
        return self.last_build

    async def _run_build(self, reason: str) -> None:
        if self.build is not None or self.meta is None:
            return
        build = _Build(name="", reason=reason, started=time.monotonic(), points_at_start=0)
        self.build = build
        target: Path | None = None
        try:
            async with self.write_lock:
                # named under the lock: a restore that held it has made its shard live by now, and a build named
                # before it would have taken that shard's name (copying the restored shard into itself, then
                # removing it as a failed build's copy)
                build.name = next_shard_name(self.meta.shard)
                target = self.layout.shard_path(build.name)
                await self._copy_live(target)
                build.copy_seconds = time.monotonic() - build.started
                build.points_at_start = self._live().count(CountRequest(exact=True))
                self.points_written_at_last_build = self.points_written
            log.info("index_build_started", reason=reason, points=build.points_at_start)
            build.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "infra.vectors.edge.build",
                str(target),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            if build.cancelled:
                build.process.kill()
            out, err = await build.process.communicate()
            if build.process.returncode != 0:
                raise RuntimeError(err.decode(errors="replace").strip()[-2000:] or f"exit {build.process.returncode}")
            report = msgspec.json.decode(out.strip().splitlines()[-1])
            await self._swap_in(build, target, report)
        except asyncio.CancelledError:
            self._discard(target)
            raise
        except Exception as exc:
            self._discard(target)
            if build.cancelled:
                log.info("index_build_cancelled", reason=reason)
                return
            self.backoff_until = time.monotonic() + FAILED_BUILD_BACKOFF_SECONDS
            self.last_build = {"finished_at": _now(), "reason": reason, "error": str(exc)}
            log.error("index_build_failed", reason=reason, error=str(exc))
        finally:
            self.build = None
            build.done.set()
        self._consider_build(idle=False)

    def _discard(self, target: Path | None) -> None:
        """Remove a build's copy, unless it is the live shard (swapped in before the build was stopped): a shard
        that index.json names, on disk or in memory, is never removed (an unreadable index.json keeps it too)."""
        if target is None or (self.meta is not None and self.meta.shard == target.name):
            return
        try:
            meta = self.layout.read_meta()
        except (OSError, msgspec.DecodeError):
            log.warning("index_build_copy_kept", directory=target.name, reason="index.json unreadable")
            return
        if meta is None or meta.shard != target.name:
            shutil.rmtree(target, ignore_errors=True)

    async def _swap_in(self, build: _Build, target: Path, report: dict[str, Any]) -> None:
        async with self.write_lock:
            paused = time.monotonic()
            built = load_shard(target)
            assert self.meta is not None
            swapped = msgspec.structs.replace(self.meta, shard=build.name)
            try:
                for operation in build.oplog:
                    built.update(operation)
                built.flush()
                self.layout.write_meta(swapped)
            except BaseException:
                built.close()
                raise
            old_name, old_shard = self.meta.shard, self.shard
            self.meta, self.shard = swapped, built
            if old_shard is not None:
                old_shard.close()
            swap_seconds = time.monotonic() - paused
            info = built.info()
        self.last_build = {
            "finished_at": _now(),
            "reason": build.reason,
            "copy_seconds": round(build.copy_seconds, 3),
            "build_seconds": report["seconds"],
            "total_seconds": round(time.monotonic() - build.started, 3),
            "swap_seconds": round(swap_seconds, 3),
            "points": info.points_count,
            "indexed_points": info.indexed_vectors_count,
            "replayed_writes": len(build.oplog),
        }
        log.info("index_build_finished", **self.last_build)
        # last, and in a thread that finishes even when the engine is stopped meanwhile (asyncio.run waits for
        # it); a directory left by a killed engine is not the one index.json names, so the next start removes it
        await asyncio.to_thread(shutil.rmtree, self.layout.shard_path(old_name), True)

    async def _cancel_build(self) -> None:
        build = self.build
        if build is None:
            return
        build.cancelled = True
        if build.process is not None and build.process.returncode is None:
            build.process.kill()
        await build.done.wait()

    # ---- housekeeping -----------------------------------------------------------------------------------------

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            try:
                await self._housekeeping()
            except Exception:
                log.exception("index_housekeeping_failed")

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.shard is not None and self.unflushed and now - self.last_flush >= FLUSH_EVERY_SECONDS:
            async with self.write_lock:
                self.shard.flush()
                self.last_flush, self.unflushed = time.monotonic(), False
        self._consider_build(idle=now - self.last_write >= IDLE_BUILD_SECONDS)


class Server:
    """The Unix socket: each request runs as its own task; replies carry the request id."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def close_connections(self) -> None:
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        send_lock = asyncio.Lock()
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                request = await p.read_request(reader)
                if request is None:
                    break
                self.engine.spawn(self._answer(request, writer, send_lock))
        except (ConnectionError, ValueError, msgspec.DecodeError) as exc:
            log.warning("index_client_dropped", error=str(exc))
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _answer(self, request: p.Request, writer: asyncio.StreamWriter, send_lock: asyncio.Lock) -> None:
        try:
            reply = p.Reply(request.id, result=await self.engine.handle(request.op))
        except EngineError as exc:
            reply = p.Reply(request.id, error=p.Failure(exc.kind, str(exc)))
        except Exception as exc:
            log.exception("index_operation_failed", operation=type(request.op).__name__)
            reply = p.Reply(request.id, error=p.Failure("unavailable", f"{type(exc).__name__}: {exc}"))
        if writer.is_closing():
            return
        async with send_lock:
            writer.write(p.frame(reply))
            with contextlib.suppress(ConnectionError):
                await writer.drain()


async def copy_tree(source: Path, target: Path) -> None:
    """GNU cp keeps Edge's sparse files sparse (shutil would write out every hole) and reflinks where it can."""
    process = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", str(source), str(target), stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise OSError(f"copying {source} failed: {err.decode(errors='replace').strip()}")


def _now() -> str:
    return datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")


def _say(hello: p.Hello) -> None:
    sys.stdout.write(msgspec.json.encode(hello).decode() + "\n")
    sys.stdout.flush()


def _take_lock(layout: EngineLayout) -> int | None:
    """Hold engine.lock, or say `in_use` and return None.

    A holder with no socket is an engine starting up or flushing on its way out (it removes its socket first):
    wait up to HANDOVER_SECONDS for it rather than refuse a server restarted right after the last one stopped.
    """
    fd = os.open(layout.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + HANDOVER_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if layout.socket_path.exists() or time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                _say(
                    p.Hello(
                        ready=False,
                        kind="in_use",
                        error=f"the embedded index at {layout.root} is in use by another process"
                        + (f" (pid {holder})" if holder else ""),
                    )
                )
                return None
            time.sleep(_HANDOVER_POLL_SECONDS)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _watch_parent(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    """Stop when the parent closes our stdin (or dies): no engine outlives the server that started it."""

    def wait_for_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(65536):
                pass
        loop.call_soon_threadsafe(stopping.set)

    threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


async def _serve(layout: EngineLayout, build_points: int) -> None:
    engine = Engine(layout, build_points)
    try:
        engine.open()
    except Exception as exc:
        _say(p.Hello(ready=False, kind="unavailable", error=f"cannot open the embedded index at {layout.root}: {exc}"))
        raise SystemExit(1) from exc
    socket_path = layout.socket_path
    socket_path.unlink(missing_ok=True)
    handler = Server(engine)
    server = await asyncio.start_unix_server(handler.connection, path=str(socket_path))
    os.chmod(socket_path, 0o600)
    engine.spawn(engine.tick())
    _watch_parent(asyncio.get_running_loop(), engine.stopping)
    meta = engine.meta
    _say(p.Hello(ready=True, has_index=meta is not None, model_id=meta and meta.model_id, dim=meta and meta.dim))
    try:
        await engine.stopping.wait()
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)
        await handler.close_connections()
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--build-points", type=int, default=10000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args()
    configure_logging(args.log_level, args.log_format)
    layout = EngineLayout(args.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(layout)
    if lock is None:
        raise SystemExit(EXIT_IN_USE)
    structlog.contextvars.bind_contextvars(component="vector-engine")
    asyncio.run(_serve(layout, args.build_points))


if __name__ == "__main__":
    main()
