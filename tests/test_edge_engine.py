"""The embedded engine beyond the shared contract: its own process, persistence, ownership, crash recovery,
graph builds that keep results consistent, and the one-time import of a qdrant-client local-mode directory."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest

from infra.settings import Settings
from infra.startup import StartupError
from infra.vectors import (
    EmbeddingModelMismatchError,
    ImageRecord,
    IndexInUseError,
    ListingPosition,
    VectorIndexUnavailableError,
)
from infra.vectors.edge import protocol
from infra.vectors.edge.client import EdgeIndex, upsert_operation
from infra.vectors.edge.engine import Engine
from infra.vectors.edge.layout import EngineLayout
from infra.vectors.server import QdrantServerIndex
from processor.runtime import Runtime
from tests.support.amqp import wait_until
from tests.support.server import running_server

DIM = 16
ROOT = Path(__file__).resolve().parent.parent


def _record(image_id: str, created_us: int) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        r2_key=f"images/originals/{image_id}.png",
        content_type="image/png",
        size=1,
        width=1,
        height=1,
        created_at=f"t{created_us}",
        created_us=created_us,
        source="upload",
    )


def _points(count: int, seed: int = 0) -> tuple[list[ImageRecord], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [_record(str(uuid.uuid4()), 1_000 + step) for step in range(count)], vectors


async def _fill(index: EdgeIndex, records: list[ImageRecord], vectors: np.ndarray) -> None:
    for start in range(0, len(records), 64):
        await index.upsert(list(zip(records[start : start + 64], vectors[start : start + 64], strict=True)))


async def _open(path: Path, **kwargs) -> EdgeIndex:
    index = await EdgeIndex.open(path, "images", log_format="console", log_level="warning", **kwargs)
    await index.ensure_collection("model-a", DIM)
    return index


async def test_data_survives_a_restart(tmp_path):
    records, vectors = _points(50)
    index = await _open(tmp_path, build_points=0)
    assert (tmp_path / "edge" / "images" / "index.json").is_file()
    await _fill(index, records, vectors)
    await index.close()

    reopened = await _open(tmp_path, build_points=0)
    try:
        assert not reopened.fresh
        assert await reopened.count() == 50
        [(best, score)] = await reopened.search(vectors[7].tolist(), 1)
        assert best == records[7]
        assert score == pytest.approx(1.0, abs=1e-5)
    finally:
        await reopened.close()


async def test_one_owner_per_directory_and_others_attach(tmp_path):
    index = await _open(tmp_path, build_points=0)
    try:
        assert index.fresh is False
        with pytest.raises(IndexInUseError, match="in use by another process"):
            await EdgeIndex.open(tmp_path, "images")
        records, vectors = _points(3)
        await _fill(index, records, vectors)
        attached = await EdgeIndex.attach(tmp_path, "images")
        assert attached is not None
        try:
            assert await attached.count() == 3
            assert (await attached.get(records[1].id)) == records[1]
        finally:
            await attached.close()
        assert await index.count() == 3
    finally:
        await index.close()
    assert await EdgeIndex.attach(tmp_path, "images") is None


async def test_the_engine_is_restarted_after_a_crash_and_keeps_every_write(tmp_path):
    records, vectors = _points(20)
    index = await _open(tmp_path, build_points=0)
    try:
        await _fill(index, records, vectors)
        crashed = index.engine_pid
        os.kill(crashed, signal.SIGKILL)
        await asyncio.sleep(0.3)
        assert await index.count() == 20
        assert index.engine_pid != crashed
        assert (await index.get(records[3].id)) == records[3]
    finally:
        await index.close()


async def test_the_engine_stops_when_its_owner_dies(tmp_path):
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from pathlib import Path
        from infra.vectors.edge.client import EdgeIndex
        async def main():
            index = await EdgeIndex.open(Path({str(tmp_path)!r}), "images", log_level="warning")
            await index.ensure_collection("model-a", {DIM})
            print("ready", flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert await EdgeIndex.attach(tmp_path, "images") is not None
    finally:
        owner.kill()
        owner.wait()

    async def engine_gone() -> bool:
        return await EdgeIndex.attach(tmp_path, "images") is None

    await wait_until(engine_gone, timeout=20)
    index = await _open(tmp_path, build_points=0)
    await index.close()


async def test_a_new_owner_waits_for_an_engine_that_is_flushing_on_its_way_out(tmp_path):
    """An engine removes its socket before its last flush and holds its lock until it exits: a server restarted
    in that window waits for the lock instead of refusing the directory as in use."""
    index = await _open(tmp_path, build_points=0)
    await index.close()
    layout = EngineLayout.under(tmp_path, "images")
    fd = os.open(layout.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the departing engine, socket gone, still flushing
    try:
        opening = asyncio.create_task(_open(tmp_path, build_points=0))
        await asyncio.sleep(1.0)
        assert not opening.done()
    finally:
        os.close(fd)
    reopened = await asyncio.wait_for(opening, 30)
    await reopened.close()


# The ops an engine knew before the protocol had a version (and before InIdOrder)
_PRE_VERSION_OPERATIONS = (
    protocol.Create
    | protocol.Upsert
    | protocol.Delete
    | protocol.Retrieve
    | protocol.Vector
    | protocol.Search
    | protocol.Newest
    | protocol.Count
    | protocol.Describe
    | protocol.Snapshot
    | protocol.Install
    | protocol.MarkMigrated
    | protocol.Build
    | protocol.Shutdown
)


class _PreVersionRequest(msgspec.Struct, array_like=True):
    id: int
    op: _PRE_VERSION_OPERATIONS


async def _pre_version_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An engine's connection as it was before the protocol had a version: a request it cannot decode (an op it
    does not know) ends the connection, without a reply."""
    decoder = msgspec.msgpack.Decoder(_PreVersionRequest)
    try:
        with contextlib.suppress(asyncio.IncompleteReadError, msgspec.DecodeError):
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                request = decoder.decode(await reader.readexactly(length))
                writer.write(protocol.frame(protocol.Reply(request.id, result=0)))
    finally:
        writer.close()


async def test_attach_names_an_engine_from_before_protocol_versions(tmp_path):
    """`ams-ops` upgraded while the server (and its engine) still runs the code from before versions: attach says
    so, instead of the connection dropping at the first op that engine does not know."""
    layout = EngineLayout.under(tmp_path, "images")
    layout.root.mkdir(parents=True)
    engine = await asyncio.start_unix_server(_pre_version_engine, path=str(layout.socket_path))
    try:
        with pytest.raises(
            VectorIndexUnavailableError,
            match=rf"at {re.escape(str(layout.root))} speaks index protocol 0 \(from before.*this code speaks"
            ".*restart the server that owns the index",
        ):
            attached = await EdgeIndex.attach(tmp_path, "images")
            await attached.newest(5, ListingPosition(created_us=1, image_id=str(uuid.uuid4())))
    finally:
        engine.close()
        await engine.wait_closed()


async def test_attach_names_both_versions_when_the_running_engine_speaks_another(tmp_path, monkeypatch):
    index = await _open(tmp_path, build_points=0)
    try:
        spoken = protocol.PROTOCOL_VERSION
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", spoken + 1)  # this code is newer than the running engine
        with pytest.raises(
            VectorIndexUnavailableError,
            match=rf"speaks index protocol {spoken}, this code speaks index protocol {spoken + 1}: .*restart the "
            "server that owns the index",
        ):
            await EdgeIndex.attach(tmp_path, "images")
        monkeypatch.undo()
        assert await index.count() == 0  # the owner's engine is untouched
    finally:
        await index.close()


async def test_an_owner_refuses_an_engine_started_from_code_of_another_version(tmp_path, monkeypatch):
    """The code on disk changed under a running server, then its engine crashed: the engine restarted from that
    code is stopped, and every later call says why, without starting another."""
    index = await _open(tmp_path, build_points=0)
    try:
        spoken = protocol.PROTOCOL_VERSION
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", spoken + 1)
        os.kill(index.engine_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        for _ in range(2):
            with pytest.raises(
                VectorIndexUnavailableError,
                match=rf"speaks index protocol {spoken}, this server speaks index protocol {spoken + 1}: .*restart",
            ):
                await index.count()
            assert index.engine_pid is None
    finally:
        await index.close()
    assert await EdgeIndex.attach(tmp_path, "images") is None
    with pytest.raises(VectorIndexUnavailableError, match=rf"speaks index protocol {spoken}, this server speaks"):
        await EdgeIndex.open(tmp_path, "images")
    assert await EdgeIndex.attach(tmp_path, "images") is None


async def _killed_as_it_is_greeted(index: EdgeIndex) -> None:
    """The engine dies (out of memory, a crash in native code) once it is ready, as the handshake begins."""
    index._process.kill()
    await index._process.wait()


async def _gone_with_its_socket(index: EdgeIndex) -> None:
    """The engine is gone, its socket too (it removes it when it stops on an error of its own)."""
    await _killed_as_it_is_greeted(index)
    index.layout.socket_path.unlink()


async def _dropping_every_request(index: EdgeIndex) -> None:
    """The engine runs, but drops the connection of the handshake and the one that asks it for a count."""

    async def dropped(reader, writer, op):
        return None

    index._ask = dropped


@pytest.mark.parametrize(
    "failure",
    [_killed_as_it_is_greeted, _gone_with_its_socket, _dropping_every_request],
    ids=["killed as it is greeted", "gone with its socket", "dropping every request"],
)
async def test_an_engine_that_fails_as_it_is_restarted_leaves_the_index_unavailable(tmp_path, monkeypatch, failure):
    """The engine restarted after a crash dies (or drops the connection) before the handshake ends: the call fails
    as the index being unavailable (a 503, a job retried), not as a bare connection error; the next call starts
    another engine."""
    records, vectors = _points(5)
    index = await _open(tmp_path, build_points=0)
    try:
        await _fill(index, records, vectors)
        handshake = EdgeIndex._handshake

        async def failing(self, reader, writer):
            monkeypatch.undo()
            await failure(self)
            return await handshake(self, reader, writer)

        monkeypatch.setattr(EdgeIndex, "_handshake", failing)
        os.kill(index.engine_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        with pytest.raises(VectorIndexUnavailableError, match="as it started"):
            await index.count()
        vars(index).pop("_ask", None)  # the engine answers again
        assert await index.count() == 5
    finally:
        await index.close()


async def test_the_api_answers_503_when_the_restarted_engine_dies_at_the_handshake(make_settings, monkeypatch):
    """Not a 500: the request is answered as the index being unavailable, and the next one restarts the engine."""
    async with running_server(make_settings()) as server:
        index = server.services.index
        assert (await server.client.get("/v1/images")).status_code == 200
        handshake = EdgeIndex._handshake

        async def dying(self, reader, writer):
            await _killed_as_it_is_greeted(self)
            return await handshake(self, reader, writer)

        monkeypatch.setattr(EdgeIndex, "_handshake", dying)
        os.kill(index.engine_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        response = await server.client.get("/v1/images")
        monkeypatch.undo()
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "index_unavailable"
        assert (await server.client.get("/v1/images")).status_code == 200


async def test_readyz_says_a_restart_is_needed_when_the_engine_speaks_another_protocol(make_settings, monkeypatch):
    """Retrying does not help an owner that refuses its engine's protocol: /readyz says so by its own state."""
    async with running_server(make_settings()) as server:
        spoken = protocol.PROTOCOL_VERSION
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", spoken + 1)
        os.kill(server.services.index.engine_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        ready = await server.client.get("/readyz")
        monkeypatch.undo()
        assert ready.status_code == 503
        assert ready.json()["checks"]["qdrant"] == "restart needed"


async def test_graph_builds_keep_results_exact_and_writes_made_meanwhile(tmp_path):
    records, vectors = _points(600, seed=1)
    index = await _open(tmp_path, build_points=0)
    try:
        await _fill(index, records, vectors)
        stats = await index.stats()
        assert (stats.points, stats.indexed_points) == (600, 0)

        assert await index.build_graph() is None  # started, not waited for
        gone = records[:20]
        for record in gone:
            await index.delete(record.id)
        moved = records[20:40]
        rng = np.random.default_rng(7)
        new_vectors = rng.standard_normal((len(moved), DIM)).astype(np.float32)
        await index.upsert(list(zip(moved, new_vectors, strict=True)))
        added, added_vectors = _points(30, seed=2)
        await _fill(index, added, added_vectors)
        assert (await index.stats()).building

        async def built() -> bool:
            return not (await index.stats()).building

        await wait_until(built, timeout=60)
        stats = await index.stats()
        assert stats.last_build["replayed_writes"] >= 20 + 1 + 1
        assert stats.points == 600 - 20 + 30
        assert stats.indexed_points >= 600 - 20

        for record in gone:
            assert await index.get(record.id) is None
        for record, vector in zip(moved, new_vectors, strict=True):
            [(best, score)] = await index.search(vector.tolist(), 1)
            assert best.id == record.id
            assert score == pytest.approx(1.0, abs=1e-4)
        everything = {record.id: vector for record, vector in zip(records[40:], vectors[40:], strict=True)}
        for record, vector in zip(added, added_vectors, strict=True):
            everything[record.id] = vector
        ids = list(everything)
        matrix = np.stack([everything[image_id] for image_id in ids])
        found = 0
        for probe in np.random.default_rng(9).standard_normal((20, DIM)).astype(np.float32):
            exact = {ids[i] for i in np.argsort(-(matrix @ probe))[:10]}
            found += len(exact & {hit.id for hit, _ in await index.search(probe.tolist(), 10)})
        assert found / 200 >= 0.9  # the graph is approximate; recall@10 against exact search
    finally:
        await index.close()
    layout = EngineLayout.under(tmp_path, "images")
    assert layout.shard_names() == [layout.read_meta().shard]


async def test_builds_start_by_themselves_once_enough_points_wait(tmp_path):
    records, vectors = _points(400, seed=3)
    index = await _open(tmp_path, build_points=200)
    try:
        await _fill(index, records, vectors)

        async def in_graph() -> bool:
            stats = await index.stats()
            return stats.indexed_points >= 200 and not stats.building

        await wait_until(in_graph, timeout=60)
        assert (await index.stats()).last_build["reason"] == "points waiting"
        assert await index.count() == 400
    finally:
        await index.close()


async def test_leftovers_of_an_interrupted_build_are_removed_at_start(tmp_path):
    index = await _open(tmp_path, build_points=0)
    await index.close()
    layout = EngineLayout.under(tmp_path, "images")
    live = layout.read_meta().shard
    (layout.root / "shard-000099" / "segments").mkdir(parents=True)
    (layout.scratch / "snapshot-old").mkdir(parents=True)
    index = await _open(tmp_path, build_points=0)
    try:
        assert layout.shard_names() == [live]
        assert list(layout.scratch.iterdir()) == []
    finally:
        await index.close()


async def _engine(path: Path, records: list[ImageRecord], vectors: np.ndarray) -> Engine:
    """An engine run in this process (so a test can step into it), holding these points."""
    layout = EngineLayout.under(path, "images")
    layout.root.mkdir(parents=True)
    engine = Engine(layout, build_points=0)
    engine.open()
    await engine.handle(protocol.Create("model-a", DIM))
    payloads = [msgspec.to_builtins(record) for record in records]
    await engine.handle(upsert_operation([record.id for record in records], vectors, payloads))
    return engine


async def _wait_for_build(engine: Engine) -> None:
    while engine.build is not None:
        await asyncio.wait_for(engine.build.done.wait(), 60)


async def test_a_stop_while_the_old_shard_is_removed_after_a_build_keeps_the_new_one(tmp_path, monkeypatch):
    records, vectors = _points(300, seed=4)
    engine = await _engine(tmp_path, records, vectors)
    layout = engine.layout
    old = layout.shard_path(layout.read_meta().shard)
    loop = asyncio.get_running_loop()
    removing = asyncio.Event()
    release = threading.Event()
    rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):  # a large old shard: its removal takes a while
        if Path(path) == old:
            loop.call_soon_threadsafe(removing.set)
            release.wait(60)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    try:
        await engine.handle(protocol.Build(False))
        await asyncio.wait_for(removing.wait(), 60)
        assert layout.read_meta().shard != old.name  # swapped in
        await engine.close()  # the server stops meanwhile
    finally:
        release.set()

    async def old_gone() -> bool:
        return not old.exists()

    await wait_until(old_gone, timeout=30)
    live = layout.read_meta().shard
    assert layout.shard_names() == [live]
    await _reopens_with_all_indexed(tmp_path, 300)


async def test_a_build_started_during_a_restore_does_not_take_the_restored_shard_s_name(tmp_path, monkeypatch):
    records, vectors = _points(310, seed=5)
    engine = await _engine(tmp_path, records[:300], vectors[:300])
    try:
        snapshot = await engine.handle(protocol.Snapshot())  # what `ams-ops index restore --force` installs
        payloads = [msgspec.to_builtins(record) for record in records[300:]]
        await engine.handle(upsert_operation([record.id for record in records[300:]], vectors[300:], payloads))
        loop = asyncio.get_running_loop()
        move = shutil.move

        def move_while_a_build_starts(source, target):  # the engine's tick comes while the files move
            asyncio.run_coroutine_threadsafe(engine.handle(protocol.Build(False)), loop).result(30)
            return move(source, target)

        monkeypatch.setattr(shutil, "move", move_while_a_build_starts)
        await engine.handle(protocol.Install(snapshot["path"], "model-a", DIM, replace=True))
        monkeypatch.setattr(shutil, "move", move)
        await _wait_for_build(engine)
        assert "error" not in engine.last_build
        assert await engine.handle(protocol.Count()) == 300
    finally:
        await engine.close()
    layout = EngineLayout.under(tmp_path, "images")
    assert layout.shard_names() == [layout.read_meta().shard]
    await _reopens_with_all_indexed(tmp_path, 300)


async def _reopens_with_all_indexed(path: Path, count: int) -> None:
    reopened = await _open(path, build_points=0)
    try:
        assert await reopened.count() == count
        assert (await reopened.stats()).indexed_points == count
    finally:
        await reopened.close()


async def _legacy_directory(path: Path, model_id: str, count: int) -> tuple[list[ImageRecord], np.ndarray]:
    """What the server wrote before Qdrant Edge: qdrant-client's local mode on IMAGE_SEARCH_DB_PATH."""
    records, vectors = _points(count, seed=5)
    legacy = QdrantServerIndex.local(str(path), "images")
    try:
        await legacy.ensure_collection(model_id, DIM)
        for start in range(0, count, 100):
            await legacy.upsert(list(zip(records[start : start + 100], vectors[start : start + 100], strict=True)))
    finally:
        await legacy.close()
    return records, vectors


async def test_a_local_mode_directory_is_imported_once(tmp_path):
    records, vectors = await _legacy_directory(tmp_path, "model-a", 1200)
    index = await EdgeIndex.open(tmp_path, "images", build_points=0, log_level="warning")
    try:
        assert not index.fresh
        await index.ensure_collection("model-a", DIM)
        assert await index.count() == 1200
        for step in (0, 599, 1199):
            [(best, score)] = await index.search(vectors[step].tolist(), 1)
            assert best == records[step]
            assert score == pytest.approx(1.0, abs=1e-5)
        assert [r.id for r in await index.newest(2)] == [records[-1].id, records[-2].id]
    finally:
        await index.close()
    assert not (tmp_path / "meta.json").exists()
    assert (tmp_path / "migrated-local-mode" / "meta.json").is_file()
    assert (tmp_path / "migrated-local-mode" / "collection" / "images").is_dir()
    index = await _open(tmp_path, build_points=0)  # nothing left to import: starts as usual
    try:
        assert await index.count() == 1200
    finally:
        await index.close()


async def test_a_local_mode_directory_of_another_model_is_refused(tmp_path):
    await _legacy_directory(tmp_path, "model-old", 5)
    index = await EdgeIndex.open(tmp_path, "images", build_points=0, log_level="warning")
    try:
        with pytest.raises(EmbeddingModelMismatchError, match="model-old"):
            await index.ensure_collection("model-a", DIM)
    finally:
        await index.close()
    assert (tmp_path / "meta.json").is_file()


def test_a_long_directory_path_gets_its_socket_in_the_temp_dir(monkeypatch, tmp_path):
    long = EngineLayout(Path("/x" * 80))
    assert long.socket_path.name.startswith("ams-index-")
    assert long.socket_path.parent == Path(tempfile.gettempdir())
    assert EngineLayout(Path("/y" * 80)).socket_path != long.socket_path
    deep = tmp_path / ("t" * 60)  # TMPDIR too deep for a socket in it as well: /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert long.socket_path.parent == Path("/tmp")
    assert len(os.fsencode(long.socket_path)) <= 107


async def test_a_second_server_on_the_same_directory_fails_start_up_with_one_line(make_env):
    env = make_env()
    first = await Runtime.open(Settings.from_env(env))
    try:
        with pytest.raises(StartupError, match=r"in use by another process \(pid \d+\).*QDRANT_URL"):
            await Runtime.open(Settings.from_env(env))
        assert await first.index.count() == 0
    finally:
        await first.close()


async def test_an_engine_that_cannot_be_spawned_leaves_the_index_unavailable(tmp_path, monkeypatch):
    """No process can be made for the restarted engine (EAGAIN: the host's process limit): the call fails as the
    index being unavailable, and the next call starts one."""
    records, vectors = _points(3)
    index = await _open(tmp_path, build_points=0)
    try:
        await _fill(index, records, vectors)

        async def no_process(*args, **kwargs):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

        monkeypatch.setattr("infra.vectors.edge.client.asyncio.create_subprocess_exec", no_process)
        os.kill(index.engine_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        with pytest.raises(VectorIndexUnavailableError, match="could not be started"):
            await index.count()
        monkeypatch.undo()
        await asyncio.sleep(1.0)  # past the pause between restarts
        assert await index.count() == 3
    finally:
        await index.close()
