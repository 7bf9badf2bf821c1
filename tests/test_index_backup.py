"""Backups of the embedded index to R2 (IMAGE_SEARCH_DB_BACKUP_*) over the S3 API: consistent snapshots, restore
into a new index before anything is consumed, rotation, damaged backups refused, old single-object backups, and
`ams-ops index` on demand (also while the server runs)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

from contract.messages import IMAGE_INDEX
from infra.settings import Settings
from infra.startup import StartupError
from infra.storage import StorageUnavailableError
from infra.storage.s3 import S3Store
from infra.vectors import attach_index
from infra.vectors.backup import IndexBackups
from infra.vectors.edge.layout import EngineLayout
from models.tiny import clip as tiny_clip
from processor import service
from processor.runtime import Runtime
from processor.service import ProcessorService, build_consumer
from tests.support.amqp import publish, wait_until
from tests.support.images import encoded

ROOT = Path(__file__).resolve().parent.parent
BACKUP = re.compile(r"^image_search\.db\.\d{8}T\d{12}Z\.tar\.gz$")


async def _index(runtime: Runtime, seeds: range) -> list[str]:
    consumer = build_consumer(runtime)
    await consumer.start()
    before = await runtime.index.count()
    ids = []
    for seed in seeds:
        body = {"data": base64.b64encode(encoded(500 + seed)).decode()}
        ids.append(await publish(runtime.settings.amqp_url, IMAGE_INDEX, body))

    async def indexed() -> bool:
        return await runtime.index.count() == before + len(seeds)

    await wait_until(indexed)
    await consumer.stop()
    return ids


def _vector(runtime: Runtime, seed: int) -> list[float]:
    with Image.open(io.BytesIO(encoded(500 + seed))) as picture:
        return runtime.clip.embed_images([picture.convert("RGB")])[0].tolist()


def _backups(s3, bucket: str) -> list[str]:
    return sorted(key for key in s3.keys(bucket, "image_search.db") if BACKUP.match(key))


@pytest.fixture
def env(make_env, s3):
    return make_env(r2_bucket=s3.new_bucket(), endpoint=s3.endpoint)


async def test_a_backup_taken_at_shutdown_is_restored_into_a_new_index(env, s3):
    first = await Runtime.open(Settings.from_env(env))
    ids = await _index(first, range(3))
    vectors = [_vector(first, seed) for seed in range(3)]
    await first.close()
    [backup] = _backups(s3, env["R2_BUCKET_NAME"])

    shutil.rmtree(env["IMAGE_SEARCH_DB_PATH"])
    second = await Runtime.open(Settings.from_env(env))
    try:
        assert await second.index.count() == 3
        for image_id, vector in zip(ids, vectors, strict=True):
            [(best, score)] = await second.index.search(vector, 1)
            assert best.id == image_id
            assert score > 0.99
    finally:
        await second.close()
    assert _backups(s3, env["R2_BUCKET_NAME"]) == [backup]  # nothing changed, so no new backup


async def test_an_existing_index_is_not_replaced_by_a_backup(env, s3):
    first = await Runtime.open(Settings.from_env(env))
    await _index(first, range(2))
    await first.close()
    again = await Runtime.open(Settings.from_env(env))
    try:
        await _index(again, range(2, 3))
    finally:
        await again.close()
    third = await Runtime.open(Settings.from_env(env))
    try:
        assert await third.index.count() == 3
    finally:
        await third.close()
    assert len(_backups(s3, env["R2_BUCKET_NAME"])) == 2


async def test_a_delete_made_by_an_api_attached_to_the_processor_s_index_is_backed_up(env, s3):
    """Split mode: the processor owns the index and backs it up, `python -m api` deletes through the engine it
    attaches to. The backup at stop holds the delete: a restore does not bring the image back."""
    first = await Runtime.open(Settings.from_env(env))
    ids = await _index(first, range(3))
    await first.close()
    [taken] = _backups(s3, env["R2_BUCKET_NAME"])

    processor = await Runtime.open(Settings.from_env(env))
    try:
        api = await attach_index(Settings.from_env(env))
        assert api is not None
        try:
            await api.delete(ids[0])  # DELETE /v1/images/{id}
        finally:
            await api.close()
    finally:
        await processor.close()
    [_, newest] = _backups(s3, env["R2_BUCKET_NAME"])
    assert newest > taken

    shutil.rmtree(env["IMAGE_SEARCH_DB_PATH"])
    restored = await Runtime.open(Settings.from_env(env))
    try:
        assert await restored.index.count() == 2
        assert await restored.index.get(ids[0]) is None
    finally:
        await restored.close()


async def test_generations_rotate(make_env, s3):
    env = make_env(r2_bucket=s3.new_bucket(), endpoint=s3.endpoint, IMAGE_SEARCH_DB_BACKUP_GENERATIONS="2")
    runtime = await Runtime.open(Settings.from_env(env))
    try:
        backups = IndexBackups(runtime.index, runtime.store, "image_search.db", generations=2)
        saved = []
        for seed in range(3):
            await _index(runtime, range(seed, seed + 1))
            saved.append((await backups.save()).key)
        assert _backups(s3, env["R2_BUCKET_NAME"]) == saved[1:]
        assert [backup.key for backup in await backups.list()] == saved[:0:-1]
        assert not await backups.changed()
    finally:
        await runtime.close()


def _rewrite(archive: bytes, change) -> bytes:
    """The same backup with `change(name, data) -> data` applied to each file (the manifest left as it was)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as source,
        tarfile.open(fileobj=out, mode="w:gz") as target,
    ):
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else None
            if data is not None and member.name != "manifest.json":
                data = change(member.name, data)
                member.size = len(data)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _flip_a_byte(name: str, data: bytes) -> bytes:
    if "vector_storage" in name and any(data):
        position = next(i for i, byte in enumerate(data) if byte)
        return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]
    return data


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
async def test_a_damaged_backup_stops_start_up_instead_of_an_empty_index(env, s3, damage):
    first = await Runtime.open(Settings.from_env(env))
    await _index(first, range(2))
    await first.close()
    [key] = _backups(s3, env["R2_BUCKET_NAME"])
    archive = s3.client.get_object(Bucket=env["R2_BUCKET_NAME"], Key=key)["Body"].read()
    damaged = _rewrite(archive, _flip_a_byte) if damage == "flipped byte" else archive[: len(archive) // 2]
    s3.client.put_object(Bucket=env["R2_BUCKET_NAME"], Key=key, Body=damaged)

    shutil.rmtree(env["IMAGE_SEARCH_DB_PATH"])
    expected = "damaged" if damage == "flipped byte" else "corrupt or truncated"
    with pytest.raises(StartupError, match=f"{re.escape(key)}.*{expected}.*IMAGE_SEARCH_DB_BACKUP_ENABLED=0"):
        await Runtime.open(Settings.from_env(env))
    assert EngineLayout.under(Path(env["IMAGE_SEARCH_DB_PATH"]), "images").read_meta() is None
    assert _backups(s3, env["R2_BUCKET_NAME"]) == [key]


async def test_a_store_that_does_not_answer_at_start_up_is_no_damaged_backup(env, s3, monkeypatch):
    """The backup cannot be read because the store did not answer (a connection reset): start-up stops as for any
    store outage, without calling the backup damaged or advising to delete it, and the next start restores it."""
    first = await Runtime.open(Settings.from_env(env))
    await _index(first, range(2))
    await first.close()
    [key] = _backups(s3, env["R2_BUCKET_NAME"])
    shutil.rmtree(env["IMAGE_SEARCH_DB_PATH"])

    async def reset(store: S3Store, key: str, path: Path) -> int:
        raise StorageUnavailableError("object store unreachable (ClientOSError: Connection reset by peer)")

    with monkeypatch.context() as patched:
        patched.setattr(S3Store, "get_file", reset)
        with pytest.raises(StartupError, match=r"^object store not usable: .*Connection reset by peer") as stopped:
            await Runtime.open(Settings.from_env(env))
    assert "delete" not in str(stopped.value) and "could not be read" not in str(stopped.value)
    assert EngineLayout.under(Path(env["IMAGE_SEARCH_DB_PATH"]), "images").read_meta() is None
    again = await Runtime.open(Settings.from_env(env))
    try:
        assert await again.index.count() == 2
    finally:
        await again.close()
    assert key in s3.keys(env["R2_BUCKET_NAME"])


class _OldPoint(msgspec.Struct):
    id: str
    vector: bytes
    payload: dict


class _OldSnapshot(msgspec.Struct, kw_only=True):
    format: str
    model_id: str
    created_at: str
    points: list[_OldPoint]


async def test_an_old_single_object_backup_is_restored_then_superseded(env, s3):
    rng = np.random.default_rng(4)
    points = []
    for step in range(5):
        image_id = f"00000000-0000-4000-8000-00000000000{step}"
        vector = rng.standard_normal(32).astype(np.float32)
        vector /= np.linalg.norm(vector)
        payload = {
            "id": image_id,
            "r2_key": f"images/originals/{image_id}.png",
            "content_type": "image/png",
            "size": 10,
            "width": 4,
            "height": 4,
            "created_at": "2026-11-20T10:00:00Z",
            "created_us": 1_700_000_000_000_000 + step,
            "source": "upload",
        }
        points.append(_OldPoint(image_id, vector.tobytes(), payload))
    blob = _OldSnapshot(format="ams-index-snapshot/1", model_id=tiny_clip.MODEL_ID, created_at="x", points=points)
    s3.client.put_object(Bucket=env["R2_BUCKET_NAME"], Key="image_search.db", Body=msgspec.msgpack.encode(blob))

    runtime = await Runtime.open(Settings.from_env(env))
    try:
        assert await runtime.index.count() == 5
        [(best, _score)] = await runtime.index.search(np.frombuffer(points[3].vector, np.float32).tolist(), 1)
        assert best.id == points[3].id
        await IndexBackups(runtime.index, runtime.store, "image_search.db", generations=3).save()
    finally:
        await runtime.close()
    assert "image_search.db" not in s3.keys(env["R2_BUCKET_NAME"])
    assert len(_backups(s3, env["R2_BUCKET_NAME"])) == 1


async def test_a_processor_s_sweep_aborts_a_backup_upload_left_behind(env, s3, monkeypatch):
    """A backup's upload in parts whose process stopped, or whose abort the store never answered, stays in the
    bucket, billed. A processor's hourly sweep (its first a minute after start, here at once) aborts one under
    IMAGE_SEARCH_DB_R2_KEY that has done nothing for S3Store.abandoned_after (moto dates every upload's start 2010:
    one that never sent a part); it keeps one that just sent a part, and one under another prefix."""
    bucket = env["R2_BUCKET_NAME"]
    begun = {
        key: s3.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        for key in ("image_search.db.20260101T000000000000Z.tar.gz", "image_search.db.20260102T000000000000Z.tar.gz")
    }
    left, going = begun
    s3.client.upload_part(Bucket=bucket, Key=going, PartNumber=1, UploadId=begun[going], Body=b"part")
    s3.client.create_multipart_upload(Bucket=bucket, Key="elsewhere/idle.bin")

    def uploads() -> set[str]:
        return {upload["Key"] for upload in s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    monkeypatch.setattr(service, "SWEEP_FIRST_AFTER_SECONDS", 0)
    processor = await ProcessorService.start(Settings.from_env(env))
    try:
        await wait_until(lambda: left not in uploads())
    finally:
        await processor.stop()
    assert uploads() == {going, "elsewhere/idle.bin"}


async def test_no_backup_when_backups_are_disabled(make_env, s3):
    env = make_env(r2_bucket=s3.new_bucket(), endpoint=s3.endpoint, IMAGE_SEARCH_DB_BACKUP_ENABLED="0")
    runtime = await Runtime.open(Settings.from_env(env))
    await _index(runtime, range(2))
    await runtime.close()
    assert s3.keys(env["R2_BUCKET_NAME"], "image_search.db") == []


async def _ams_ops(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "processor.ops",
        *args,
        cwd=ROOT,
        env={**env, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_ams_ops_index_stats_backup_and_restore(env, s3):
    runtime = await Runtime.open(Settings.from_env(env))
    try:
        await _index(runtime, range(3))
        code, out, err = await _ams_ops(env, "index", "backup")
        assert code == 0, err
        assert re.match(r"^backed up to image_search\.db\.\d{8}T\d{12}Z\.tar\.gz \(", out)
        code, out, err = await _ams_ops(env, "index", "stats", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["served_by_running_server"] is True
        assert report["index"]["points"] == 3
        assert report["index"]["model_id"] == tiny_clip.MODEL_ID
        assert len(report["backups"]) == 1
        code, out, err = await _ams_ops(env, "index", "restore")
        assert code == 1
        assert "stop it first" in err
        await _index(runtime, range(3, 5))
    finally:
        await runtime.close()
    assert len(_backups(s3, env["R2_BUCKET_NAME"])) == 2  # and one more at shutdown

    code, out, err = await _ams_ops(env, "index", "stats")
    assert code == 0, err
    assert "points           5" in out
    assert "opened by this command" in out
    code, out, err = await _ams_ops(env, "index", "restore")
    assert code == 1
    assert "add --force" in err
    older = _backups(s3, env["R2_BUCKET_NAME"])[0]
    code, out, err = await _ams_ops(env, "index", "restore", "--key", older, "--force")
    assert code == 0, err
    assert out.startswith(f"restored 3 points from {older}")
    runtime = await Runtime.open(Settings.from_env(env))
    try:
        assert await runtime.index.count() == 3
    finally:
        await runtime.close()
    code, out, err = await _ams_ops(env, "index", "restore", "--key", "image_search.db.nothing")
    assert code == 1
    assert "no index backup at" in err
