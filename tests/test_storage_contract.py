"""One contract, two stores: the embedded local directory and R2/S3 (moto over HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

from contract.jobs import JobStore, record_key
from infra.settings import Settings
from infra.storage import (
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
    local,
    validate_key,
)
from infra.storage.local import LocalStore
from infra.storage.s3 import S3Store
from tests.support.disk import fill, small_disk
from tests.support.rabbitmq import free_port
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Process, cuttable, trickling


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path, s3):
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    s3_store = await _s3_store(s3)
    yield s3_store
    await s3_store.close()


async def _s3_store(s3) -> S3Store:
    return await _connect(s3.endpoint, s3.new_bucket())


async def _connect(endpoint: str, bucket: str, timeout_seconds: float | None = None) -> S3Store:
    """An S3 store as R2_TIMEOUT_SECONDS (its default unless given) and R2_MAX_CONNECTIONS make it."""
    defaults = Settings.from_env({})
    return await S3Store.connect(
        endpoint_url=endpoint,
        bucket=bucket,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        region="us-east-1",
        timeout_seconds=timeout_seconds or defaults.r2_timeout_seconds,
        max_connections=defaults.r2_max_connections,
    )


async def test_put_get_round_trip(store):
    await store.put("images/originals/a.png", b"\x89PNG bytes", "image/png")
    stored = await store.get("images/originals/a.png")
    assert stored.data == b"\x89PNG bytes"
    assert stored.content_type == "image/png"
    assert await store.exists("images/originals/a.png")
    assert await store.size("images/originals/a.png") == len(b"\x89PNG bytes")
    await store.put("images/originals/empty.png", b"", "image/png")
    assert await store.size("images/originals/empty.png") == 0


async def test_put_overwrites(store):
    await store.put("k/one.txt", b"first", "text/plain")
    await store.put("k/one.txt", b"second, longer", "text/markdown")
    stored = await store.get("k/one.txt")
    assert (stored.data, stored.content_type) == (b"second, longer", "text/markdown")
    assert [info.key async for info in store.list("k/")] == ["k/one.txt"]


@pytest.mark.parametrize(
    ("key", "types"),
    [
        ("out/a.png", ("image/png", "application/octet-stream", "image/png")),
        ("out/b.json", ("text/plain", "application/json")),
        ("out/c", ("application/octet-stream", "text/plain")),
        ("out.d/e", ("application/json",)),
    ],
)
async def test_each_write_keeps_the_content_type_it_was_given(store, key, types):
    """The local store keeps no type file for the usual type of a suffix; a later write of another type, and back,
    still reads back as written."""
    for content_type in types:
        await store.put(key, b"bytes", content_type)
        assert (await store.get(key)).content_type == content_type


@pytest.mark.parametrize("keys", [("t/a", "t/a.json/b"), ("t/a.json/b", "t/a")])
async def test_a_key_and_one_under_it_with_json_added_each_keep_their_type(store, keys):
    """The local store's type file of `t/a` was once `meta/t/a.json`, the folder that of `t/a.json/b` needed."""
    for number, key in enumerate(keys):
        await store.put(key, f"object {number}".encode(), "text/plain")
    for number, key in enumerate(keys):
        stored = await store.get(key)
        assert (stored.data, stored.content_type) == (f"object {number}".encode(), "text/plain")
    await store.delete(keys[0])
    await store.put(keys[1], b"again", "text/markdown")
    assert (await store.get(keys[1])).content_type == "text/markdown"
    assert not await store.exists(keys[0])


async def test_a_local_store_of_the_earlier_layout_keeps_its_types(tmp_path):
    """Stores written before types/ kept an object's type in `meta/<key>.json`: it is read from there until the
    object is written again or deleted; a folder there (of a type file under `<key>.json/`) is no type file."""
    root = tmp_path / "store"
    earlier = {"t/a": "text/markdown", "u/c.png": "image/gif", "v/e.json/f": "text/csv", "v/e": None}
    for key, content_type in earlier.items():
        (root / "objects" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "objects" / key).write_bytes(b"bytes")
        if content_type is not None:
            (root / "meta" / f"{key}.json").parent.mkdir(parents=True, exist_ok=True)
            (root / "meta" / f"{key}.json").write_text(json.dumps({"content_type": content_type}))
    store = LocalStore(root)
    for key, content_type in earlier.items():
        assert (await store.get(key)).content_type == (content_type or "application/octet-stream")
    await store.put("v/e", b"new", "text/plain")
    assert [(await store.get(key)).content_type for key in ("v/e", "v/e.json/f")] == ["text/plain", "text/csv"]
    await store.put("t/a", b"new", "application/octet-stream")
    await store.delete("u/c.png")
    assert (await store.get("t/a")).content_type == "application/octet-stream"
    assert not (root / "meta" / "t").exists() and not (root / "meta" / "u").exists()
    await store.put("u/c.png", b"new", "image/png")
    assert (await store.get("u/c.png")).content_type == "image/png"


async def test_conditional_create_writes_only_when_absent(store):
    etag = await store.put("jobs/c.json", b"first", "application/json", if_none_match=True)
    assert etag and (await store.get("jobs/c.json")).etag == etag
    with pytest.raises(PreconditionFailedError):
        await store.put("jobs/c.json", b"second", "application/json", if_none_match=True)
    assert (await store.get("jobs/c.json")).data == b"first"


async def test_conditional_update_writes_only_the_version_read(store):
    first = await store.put("jobs/u.json", b"v1", "application/json")
    second = await store.put("jobs/u.json", b"v2", "application/json", if_match=first)
    assert second != first
    with pytest.raises(PreconditionFailedError):
        await store.put("jobs/u.json", b"stale", "application/json", if_match=first)
    assert (await store.get("jobs/u.json")).data == b"v2"
    await store.delete("jobs/u.json")
    with pytest.raises(PreconditionFailedError):
        await store.put("jobs/u.json", b"gone", "application/json", if_match=second)
    assert not await store.exists("jobs/u.json")


async def test_conditional_delete_deletes_only_the_version_read(store):
    first = await store.put("jobs/d.json", b"v1", "application/json")
    second = await store.put("jobs/d.json", b"v2", "application/json", if_match=first)
    with pytest.raises(PreconditionFailedError):
        await store.delete("jobs/d.json", if_match=first)
    assert (await store.get("jobs/d.json")).data == b"v2"
    assert await store.delete("jobs/d.json", if_match=second) is True
    assert not await store.exists("jobs/d.json")
    with pytest.raises(PreconditionFailedError):
        await store.delete("jobs/d.json", if_match=second)


async def test_an_s3_conditional_delete_is_refused_by_the_store_for_a_write_after_its_look(s3, monkeypatch):
    """The version is looked at (HEAD) before the delete; one written in between is kept by S3 itself (If-Match).
    The embedded store checks and deletes under one lock."""
    store = await _s3_store(s3)
    try:
        first = await store.put("jobs/w.json", b"v1", "application/json")
        head = store._client.head_object

        async def looked_then_written(**params: Any) -> dict[str, Any]:
            found = await head(**params)
            await store.put("jobs/w.json", b"v2", "application/json")
            return found

        monkeypatch.setattr(store._client, "head_object", looked_then_written)
        with pytest.raises(PreconditionFailedError):
            await store.delete("jobs/w.json", if_match=first)
        monkeypatch.undo()
        assert (await store.get("jobs/w.json")).data == b"v2"
    finally:
        await store.close()


async def test_of_racing_conditional_creates_exactly_one_wins(store):
    outcomes = await asyncio.gather(
        *(store.put("race/one.bin", bytes([n]) * 64, "application/octet-stream", if_none_match=True) for n in range(8)),
        return_exceptions=True,
    )
    winners = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert len(winners) == 1
    assert all(isinstance(outcome, PreconditionFailedError) for outcome in outcomes if outcome not in winners)
    assert (await store.get("race/one.bin")).etag == winners[0]


async def test_missing_objects(store):
    assert not await store.exists("nope/missing.bin")
    assert await store.size("nope/missing.bin") is None
    await store.put("pre/fix/x.bin", b"x", "application/octet-stream")
    assert await store.size("pre/fix") is None  # a key prefix is no object
    with pytest.raises(ObjectNotFoundError):
        await store.get("nope/missing.bin")
    assert await store.delete("nope/missing.bin") is False


async def test_a_bounded_read_refuses_an_object_larger_than_the_bound(store):
    await store.put("in/big.bin", bytes(range(256)) * 40, "application/octet-stream")
    await store.put("in/empty.bin", b"", "application/octet-stream")
    etag = await store.put("in/exact.bin", b"x" * 100, "text/plain")
    with pytest.raises(ObjectTooLargeError) as refused:
        await store.get("in/big.bin", max_bytes=100)
    assert (refused.value.key, refused.value.max_bytes, refused.value.size) == ("in/big.bin", 100, 10240)
    assert "10240 bytes" in str(refused.value)
    exact = await store.get("in/exact.bin", max_bytes=100)
    assert (exact.data, exact.content_type, exact.etag) == (b"x" * 100, "text/plain", etag)
    assert (await store.get("in/empty.bin", max_bytes=100)).data == b""
    assert (await store.get("in/big.bin", max_bytes=10240)).data == bytes(range(256)) * 40
    with pytest.raises(ObjectNotFoundError):
        await store.get("in/missing.bin", max_bytes=100)


async def test_delete(store):
    await store.put("d/x.bin", b"x", "application/octet-stream")
    assert await store.delete("d/x.bin") is True
    assert not await store.exists("d/x.bin")
    assert [info async for info in store.list("d/")] == []


async def test_list_by_prefix_in_key_order(store):
    for key in ["p/b.bin", "p/a.bin", "p/sub/c.bin", "q/d.bin", "pp/e.bin"]:
        await store.put(key, key.encode(), "application/octet-stream")
    listed = [(info.key, info.size) async for info in store.list("p/")]
    assert listed == [("p/a.bin", 7), ("p/b.bin", 7), ("p/sub/c.bin", 11)]
    assert [info.key async for info in store.list("p")] == ["p/a.bin", "p/b.bin", "p/sub/c.bin", "pp/e.bin"]
    assert len([info async for info in store.list()]) == 5


async def test_a_listing_says_when_each_object_was_last_written(store):
    before = datetime.now(tz=UTC) - timedelta(seconds=2)  # S3's LastModified has whole seconds
    await store.put("when/a.bin", b"a", "application/octet-stream")
    [info] = [info async for info in store.list("when/")]
    assert before <= info.modified <= datetime.now(tz=UTC) + timedelta(seconds=1)


async def test_unicode_keys(store):
    key = "images/incoming/고양이 사진.png"
    await store.put(key, b"meow", "image/png")
    assert (await store.get(key)).data == b"meow"
    assert [info.key async for info in store.list("images/incoming/")] == [key]


async def test_presigned_url_downloads_the_object(store):
    await store.put("share/file.txt", b"shared bytes", "text/plain")
    url = await store.presigned_get_url("share/file.txt", 60)
    if isinstance(store, LocalStore):
        parsed = urlparse(url)
        assert parsed.path == "/v1/files/share/file.txt"
        query = parse_qs(parsed.query)
        assert store.verify("share/file.txt", int(query["expires"][0]), query["signature"][0])
        assert not store.verify("share/other.txt", int(query["expires"][0]), query["signature"][0])
        assert not store.verify("share/file.txt", 1, query["signature"][0])
    else:
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        assert response.status_code == 200
        assert response.content == b"shared bytes"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs/path.png",
        "../secret",
        "a/../../etc/passwd",
        "a/./b",
        "a//b",
        "trailing/",
        "bad\x00byte",
        "tab\tkey",
        "back\\slash",
        "x" * 1025,
    ],
)
async def test_unsafe_keys_are_refused_by_every_method(store, key):
    with pytest.raises(InvalidKeyError):
        validate_key(key)
    with pytest.raises(InvalidKeyError):
        await store.put(key, b"x", "text/plain")
    with pytest.raises(InvalidKeyError):
        await store.get(key)
    with pytest.raises(InvalidKeyError):
        await store.delete(key)
    with pytest.raises(InvalidKeyError):
        await store.exists(key)
    with pytest.raises(InvalidKeyError):
        await store.size(key)
    with pytest.raises(InvalidKeyError):
        await store.presigned_get_url(key, 60)


async def test_the_local_store_refuses_a_key_segment_longer_than_a_file_name(tmp_path):
    """S3 and R2 take them; a file name is at most 255 bytes (the meta file adds ".json")."""
    store = LocalStore(tmp_path / "store")
    fits, too_long = "in/" + "a" * 250 + ".png", "in/" + "a" * 251 + ".png"
    await store.put(fits[:-4], b"x", "image/png")
    for call in (
        lambda: store.put(too_long, b"x", "image/png"),
        lambda: store.get(too_long),
        lambda: store.size(too_long),
        lambda: store.exists(too_long),
        lambda: store.delete(too_long),
        lambda: store.flush(too_long),
    ):
        with pytest.raises(InvalidKeyError, match="longer than 250 bytes"):
            await call()
    assert (await store.get(fits[:-4])).data == b"x"


async def test_ping(store):
    await store.ping()


async def test_local_store_leaves_no_partial_files(tmp_path):
    store = LocalStore(tmp_path / "store")
    await store.put("a/b.bin", b"1" * 100_000, "application/octet-stream")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert (tmp_path / "store" / "signing.key").stat().st_mode & 0o777 == 0o600
    again = LocalStore(tmp_path / "store")
    assert again.sign("a/b.bin", 10) == store.sign("a/b.bin", 10)


def _open_store_and_send_its_key(root: str, start: Any, keys: Any) -> None:
    start.wait()
    try:
        keys.put(LocalStore(Path(root))._secret)
    except Exception as exc:  # the parent asserts on what each process got
        keys.put(repr(exc).encode())


def test_processes_opening_a_fresh_store_together_share_one_signing_key(tmp_path):
    """Processes started together on an empty LOCAL_STORAGE_DIR: none fails, and all sign with the one key."""
    context = multiprocessing.get_context("fork")
    for round_number in range(10):
        root = tmp_path / f"store{round_number}"
        start, keys = context.Barrier(2), context.Queue()
        openers = [
            context.Process(target=_open_store_and_send_its_key, args=(str(root), start, keys)) for _ in range(2)
        ]
        for opener in openers:
            opener.start()
        got = [keys.get(timeout=30) for _ in openers]
        for opener in openers:
            opener.join()
        key = (root / "signing.key").read_bytes()
        assert got == [key, key] and len(key) == local.SECRET_LENGTH


@pytest.mark.parametrize("left", [b"", b"\n", b"abc"])
def test_a_signing_key_left_empty_or_short_is_replaced(tmp_path, left):
    """A process stopped while writing the key (before writes were staged) left it empty or short: an empty HMAC
    key would let anyone sign a link."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "signing.key").write_bytes(left)
    store = LocalStore(tmp_path / "store")
    key = (tmp_path / "store" / "signing.key").read_bytes()
    assert store._secret == key and len(key) == local.SECRET_LENGTH
    assert LocalStore(tmp_path / "store")._secret == key


@pytest.mark.parametrize("size", [0, 1000, 11 * 1024 * 1024 + 7])
async def test_files_go_up_and_come_back_streamed(store, tmp_path, s3, size):
    if isinstance(store, S3Store):
        store.part_bytes = 5 * 1024 * 1024  # the 11 MiB file then goes up as a multipart upload of 3 parts
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    await store.put_file("backups/index.tar.gz", source, "application/gzip")
    target = tmp_path / "download.bin"
    assert await store.get_file("backups/index.tar.gz", target) == size
    assert target.read_bytes() == data
    assert (await store.get("backups/index.tar.gz")).content_type == "application/gzip"
    assert [info.size async for info in store.list("backups/")] == [size]
    if isinstance(store, S3Store) and size > store.part_bytes:
        etag = s3.client.head_object(Bucket=store.bucket, Key="backups/index.tar.gz")["ETag"]
        assert etag.endswith('-3"')  # a multipart upload of 3 parts
    with pytest.raises(ObjectNotFoundError):
        await store.get_file("backups/missing", tmp_path / "missing.bin")


async def test_local_writes_flush_what_durability_needs(tmp_path, monkeypatch):
    """A durable write flushes the staged file, then, once it is moved into place, its folder; one that is not
    durable flushes nothing but a folder it had to make, and flush() makes it durable later (file, then folder)."""
    store = LocalStore(tmp_path / "store")
    objects = store.root / "objects"
    flushed: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    await store.put("jobs/a.json", b"{}", "application/json", if_none_match=True, durable=False)
    assert flushed == [str(objects)]  # the new folder jobs/, in its parent
    flushed.clear()
    await store.put("jobs/a.json", b"{ }", "application/json", if_match=_md5(b"{}"), durable=False)
    await store.put("jobs/b.bin", b"x", "application/octet-stream", durable=False)
    assert flushed == []
    await store.flush("jobs/a.json")
    assert flushed == [str(objects / "jobs" / "a.json"), str(objects / "jobs")]
    flushed.clear()
    await store.put("jobs/c.json", b"{}", "application/json", if_none_match=True)
    assert len(flushed) == 2 and flushed[0].startswith(str(store.root / "tmp")) and flushed[1] == str(objects / "jobs")
    flushed.clear()
    await store.put("jobs/d.bin", b"x", "text/plain")  # its type file (in a new folder), then the object
    staged = ["staged" if path.startswith(str(store.root / "tmp")) else path for path in flushed]
    types = store.root / "types"
    shard = types / hashlib.sha256(b"jobs/d.bin").hexdigest()[:2]
    assert staged == [str(types), "staged", str(shard), "staged", str(objects / "jobs")]
    flushed.clear()
    await store.flush("elsewhere/none.json")  # nothing there: nothing to keep
    assert flushed == []
    await store.put("jobs/d.bin", b"y", "text/csv", durable=False)
    await store.flush("jobs/d.bin")  # the object, its type file and that one's folder, the object's folder
    typed = shard / f"{hashlib.sha256(b'jobs/d.bin').hexdigest()}.json"
    assert flushed == [str(objects / "jobs" / "d.bin"), str(typed), str(shard), str(objects / "jobs")]
    assert (await store.get("jobs/a.json")).data == b"{ }"
    assert (await store.get("jobs/d.bin")).content_type == "text/csv"


async def test_small_unflushed_local_writes_are_made_on_the_event_loop(tmp_path, monkeypatch):
    """A record or a small output written without a flush, or read, costs no thread hand-offs; a durable write, a
    large one, one into a folder not made yet, a background one (a running mark, beside the model), and a large
    read go to a thread."""
    store = LocalStore(tmp_path / "store")
    await store.put("jobs/seed.json", b"{}", "application/json")
    handed: list[str] = []
    real_to_thread = asyncio.to_thread

    async def to_thread(func, /, *args, **kwargs):
        handed.append(func.__name__)
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    await store.put("jobs/a.json", b"{}", "application/json", if_none_match=True, durable=False)
    await store.put("jobs/a.json", b"{ }", "application/json", if_match=_md5(b"{}"), durable=False)
    await store.put("jobs/b.bin", b"x" * local.INLINE_BYTES, "application/octet-stream", durable=False)
    with pytest.raises(PreconditionFailedError):
        await store.put("jobs/a.json", b"[]", "application/json", if_none_match=True, durable=False)
    assert handed == []
    await store.put("jobs/c.json", b"{}", "application/json", if_none_match=True)
    await store.put("jobs/d.bin", b"x" * (local.INLINE_BYTES + 1), "application/octet-stream", durable=False)
    await store.put("new/e.json", b"{}", "application/json", durable=False)
    await store.put("jobs/a.json", b"{}", "application/json", if_match=_md5(b"{ }"), durable=False, background=True)
    assert handed == ["_put_conditional_sync", "_put_bytes_sync", "_put_bytes_sync", "_put_conditional_sync"]
    handed.clear()
    assert (await store.get("jobs/a.json")).data == b"{}"
    with pytest.raises(ObjectNotFoundError):
        await store.get("jobs/none.json")
    assert (await store.exists("jobs/b.bin"), await store.size("jobs/b.bin")) == (True, local.INLINE_BYTES)
    assert handed == []  # small reads, and looking a key up, are made on the event loop too
    assert len((await store.get("jobs/d.bin")).data) == local.INLINE_BYTES + 1
    assert handed == ["_get_sync"]


async def test_an_unflushed_conditional_write_does_not_block_the_event_loop_on_a_held_lock(tmp_path):
    """Another writer (a thread, or another process on the same folder) holds the store's lock: the write waits for
    it in a thread, and the event loop goes on meanwhile."""
    store = LocalStore(tmp_path / "store")
    await store.put("jobs/seed.json", b"{}", "application/json")
    held = (store.root / "conditional-writes.lock").open("a+b")
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(0.4, held.close).start()  # closing the file lets the lock go
    write = asyncio.create_task(store.put("jobs/a.json", b"{}", "application/json", if_none_match=True, durable=False))
    ticks = [time.monotonic()]
    while not write.done():
        await asyncio.sleep(0.01)
        ticks.append(time.monotonic())
    assert await write == _md5(b"{}")
    assert ticks[-1] - ticks[0] >= 0.35  # it waited for the lock
    assert max(later - earlier for earlier, later in itertools.pairwise(ticks)) < 0.2  # and the loop did not


async def test_a_replaced_local_version_is_unlinked_after_the_write(tmp_path):
    """The version a write replaces keeps a second name in the staging folder until the store's reaper thread
    unlinks it (freeing the file is then not on the writer's time); readers only ever see the new version."""
    store = LocalStore(tmp_path / "store")
    await store.put("jobs/a.json", b'"old"', "application/json")
    gate = threading.Event()
    store._reaper.submit(gate.wait, 10)
    await store.put("jobs/a.json", b'"new"', "application/json", if_match=_md5(b'"old"'), durable=False)
    aside = list((store.root / "tmp").iterdir())
    assert [path.name.endswith(".replaced") for path in aside] == [True]
    assert aside[0].read_bytes() == b'"old"'
    assert (await store.get("jobs/a.json")).data == b'"new"'
    gate.set()
    await store.close()  # waits for the reaper
    assert list((store.root / "tmp").iterdir()) == []
    await store.put("jobs/a.json", b'"later"', "application/json", durable=False)  # its own unlink, at once
    assert list((store.root / "tmp").iterdir()) == []
    assert (await store.get("jobs/a.json")).data == b'"later"'


async def test_what_a_stopped_writer_left_in_staging_is_removed_an_hour_on(tmp_path, monkeypatch):
    LocalStore(tmp_path / "store")
    left = tmp_path / "store" / "tmp" / "tmpk2j3h4"
    left.write_bytes(b"half a record")
    LocalStore(tmp_path / "store")
    assert left.exists()  # recent: perhaps another process's write in progress
    await asyncio.sleep(0.05)
    monkeypatch.setattr(local, "STALE_STAGING_SECONDS", 0)
    LocalStore(tmp_path / "store")
    assert not left.exists()


async def test_a_full_disk_is_the_local_store_being_unavailable_and_leaves_nothing_behind(tmp_path):
    with small_disk(tmp_path / "disk", size_kib=1024) as disk:
        store = LocalStore(disk / "store")
        etag = await store.put("jobs/a.json", b'"queued"', "application/json", if_none_match=True, durable=False)
        filler = fill(disk)
        for write in (
            lambda: store.put("jobs/a.json", b'"running"' * 1000, "application/json", if_match=etag, durable=False),
            lambda: store.put("jobs/b.json", b"{}" * 3000, "application/json", if_none_match=True, durable=False),
            lambda: store.put("images/c.png", bytes(100_000), "image/png"),
        ):
            with pytest.raises(StorageUnavailableError, match="No space left on device"):
                await write()
        assert (await store.get("jobs/a.json")).data == b'"queued"'
        assert list((disk / "store" / "tmp").iterdir()) == []
        assert not await store.exists("jobs/b.json")
        filler.unlink()
        await store.put("jobs/a.json", b'"running"', "application/json", if_match=etag, durable=False)
        assert (await store.get("jobs/a.json")).data == b'"running"'


class _Failing:
    """An S3 client every call of which fails with one error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def put_object(self, **_params: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("RequestTimeout", 400),
        ("RequestTimeoutException", 400),
        ("PriorRequestNotComplete", 400),
        ("SlowDown", 503),
        ("OperationAborted", 409),
    ],
)
async def test_a_transient_s3_error_is_the_store_being_unavailable_whatever_its_status(code, status):
    """Retried by the processor and a 503 from the API, as a 5xx is, even on a conditional write."""
    error = ClientError(
        {"Error": {"Code": code, "Message": "try again"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    assert isinstance(S3Store._translate(error, "jobs/a.json"), StorageUnavailableError)
    store = S3Store(_Failing(error), "bucket", contextlib.AsyncExitStack())
    for conditions in ({}, {"if_none_match": True}, {"if_match": _md5(b"{}")}):
        with pytest.raises(StorageUnavailableError, match=code):
            await store.put("jobs/a.json", b"{}", "application/json", **conditions)


def test_a_refusal_from_s3_is_not_retried():
    error = ClientError(
        {"Error": {"Code": "RequestTimeTooSkewed", "Message": "clock"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
        "PutObject",
    )
    translated = S3Store._translate(error, "jobs/a.json")
    assert type(translated) is StorageError


async def test_a_job_record_left_empty_reads_as_absent_and_is_replaced(store):
    """A write that was not flushed to disk may leave an empty file after a power failure: the record reads as
    missing, and the next create replaces it; a readable record still refuses a second create."""
    jobs = JobStore(store, 7)
    await store.put(record_key("j1"), b"", "application/json")
    assert await jobs.load("j1") is None
    record = JobStore.new("j1", "image.generate", {"prompt": "p"})
    await jobs.create(record, durable=False)
    assert (await jobs.get("j1")) == record
    with pytest.raises(PreconditionFailedError):
        await jobs.create(JobStore.new("j1", "image.generate", {"prompt": "other"}))
    assert (await jobs.get("j1")) == record


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


async def test_a_dropped_connection_makes_the_s3_ping_say_so():
    """Readiness names the store's own failure: a connection the S3 server dropped (botocore's error without a
    response) is the store unavailable, not an AttributeError of the check."""

    class Dropping:
        async def head_bucket(self, **_: object) -> None:
            raise ConnectionClosedError(endpoint_url="http://s3.invalid/bucket")

    store = S3Store(Dropping(), "bucket", contextlib.AsyncExitStack())
    with pytest.raises(StorageUnavailableError, match="ConnectionClosedError"):
        await store.ping()


STALL_SECONDS = 1.0  # R2_TIMEOUT_SECONDS in the tests of a store that stops answering


async def _unavailable_within(seconds: float, *calls: Awaitable[object]) -> None:
    """Each call must fail as the store being unavailable, all within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            failures = await asyncio.gather(*calls, return_exceptions=True)
    except TimeoutError:
        raise AssertionError(f"still waiting on the store after {seconds} s") from None
    assert all(isinstance(failure, StorageUnavailableError) for failure in failures), failures


async def test_every_s3_call_to_a_store_that_stops_answering_is_unavailable_within_its_timeout(tmp_path):
    """A frozen S3 server (connections accepted, nothing answered): each call gives up after R2_TIMEOUT_SECONDS,
    a write too (botocore's "Expect: 100-continue" had aiohttp wait for good before sending the body), and an
    upload larger than the kernel's buffers, which the server stops taking; thawed, the same client works again."""
    s3 = S3Process(free_port())
    try:
        s3.create_bucket("stalls")
        store = await _connect(s3.endpoint, "stalls", STALL_SECONDS)
        try:
            await store.put("jobs/a.json", b"{}", "application/json")
            large = tmp_path / "large.bin"
            large.write_bytes(os.urandom(64 * 1024 * 1024))
            with s3.frozen():
                await _unavailable_within(
                    STALL_SECONDS + 1,  # one try each: botocore's own retry would double it
                    store.put("jobs/b.json", b"{}", "application/json"),
                    store.put("jobs/c.json", b"{}", "application/json", if_none_match=True),
                    store.get("jobs/a.json"),
                    store.size("jobs/a.json"),
                    store.delete("jobs/a.json"),
                    store.ping(),
                    _listed(store, "jobs/"),
                )
                # the kernel takes a few MiB, then the server's window stays shut: TCP_USER_TIMEOUT drops it
                await _unavailable_within(10 * STALL_SECONDS, store.put_file("backups/large.bin", large, "x/y"))
            await store.put("jobs/d.json", b"{}", "application/json")
            assert (await store.get("jobs/d.json")).data == b"{}"
        finally:
            await store.close()
    finally:
        s3.stop()


async def _listed(store: S3Store, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


def _uploads(s3, bucket: str) -> set[str]:
    """The keys of the bucket's incomplete uploads in parts."""
    return {upload["Key"] for upload in s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}


def _parted(store: S3Store, tmp_path: Path) -> Path:
    """A file that goes up in 3 parts (5 MiB, S3's least, with the store's part size set so)."""
    store.part_bytes = 5 * 1024 * 1024
    source = tmp_path / "index.tar.gz"
    source.write_bytes(os.urandom(11 * 1024 * 1024))
    return source


async def test_an_upload_in_parts_whose_abort_never_reached_the_store_is_aborted_by_a_later_sweep(
    s3, tmp_path, monkeypatch
):
    """The link to the store goes dead (every packet dropped) while a backup goes up in parts: its next part
    fails after R2_TIMEOUT_SECONDS, and so does the abort, which the store never gets; the part already sent stays
    in the bucket (billed, and no object ever made of it). Once that upload has done nothing for
    `abandoned_after`, the sweep (remove_abandoned_writes) aborts it."""
    bucket = s3.new_bucket()
    async with cuttable(s3.endpoint) as link:
        store = await _connect(link.endpoint, bucket, STALL_SECONDS)
        try:
            source = _parted(store, tmp_path)
            upload_part = store._client.upload_part

            async def cut_before_the_second(**kwargs: Any) -> Any:
                link.cut = kwargs["PartNumber"] == 2
                return await upload_part(**kwargs)

            monkeypatch.setattr(store._client, "upload_part", cut_before_the_second)
            await _unavailable_within(10 * STALL_SECONDS, store.put_file("backups/index.tar.gz", source, "x/y"))
            link.cut = False
            assert _uploads(s3, bucket) == {"backups/index.tar.gz"}
            store.abandoned_after = timedelta(seconds=1)  # its part went up two timeouts ago (part 2, abort)
            assert await store.remove_abandoned_writes("backups/") == 1
        finally:
            await store.close()
    assert _uploads(s3, bucket) == set()
    assert s3.keys(bucket) == []


async def test_the_sweep_keeps_an_upload_in_parts_that_goes_on_and_one_outside_its_prefix(s3, tmp_path, monkeypatch):
    """An upload is abandoned when it has done nothing for `abandoned_after`: neither begun nor sent a part since.
    moto dates every upload's start 2010, so what keeps one that goes on here is the part it just sent (an upload
    begun and never sent a part is aborted, as one that began long ago). An upload under another prefix is not the
    sweep's, however idle."""
    bucket = s3.new_bucket()
    store = await _connect(s3.endpoint, bucket)
    try:
        source = _parted(store, tmp_path)
        store.abandoned_after = timedelta(seconds=2)
        s3.client.create_multipart_upload(Bucket=bucket, Key="elsewhere/idle.bin")
        s3.client.create_multipart_upload(Bucket=bucket, Key="backups/begun.tar.gz")
        idle = s3.client.create_multipart_upload(Bucket=bucket, Key="backups/idle.tar.gz")["UploadId"]
        s3.client.upload_part(Bucket=bucket, Key="backups/idle.tar.gz", PartNumber=1, UploadId=idle, Body=b"part")
        await asyncio.sleep(3)  # its part is older than abandoned_after (moto dates it to the second)
        first_sent, go_on = asyncio.Event(), asyncio.Event()
        upload_part = store._client.upload_part

        async def paused_after_the_first(**kwargs: Any) -> Any:
            if kwargs["PartNumber"] == 2:
                first_sent.set()
                await go_on.wait()
            return await upload_part(**kwargs)

        monkeypatch.setattr(store._client, "upload_part", paused_after_the_first)
        live = asyncio.create_task(store.put_file("backups/index.tar.gz", source, "application/gzip"))
        await first_sent.wait()
        assert await store.remove_abandoned_writes("backups/") == 2
        assert _uploads(s3, bucket) == {"elsewhere/idle.bin", "backups/index.tar.gz"}
        assert await store.remove_abandoned_writes("backups/") == 0  # again, as another processor's sweep
        go_on.set()
        await live
        assert await store.size("backups/index.tar.gz") == source.stat().st_size
        assert _uploads(s3, bucket) == {"elsewhere/idle.bin"}
    finally:
        await store.close()


async def test_an_upload_in_parts_gives_up_on_a_call_that_takes_longer_than_part_seconds(s3, tmp_path, monkeypatch):
    """What keeps the sweep off an upload that goes on: each of its calls (a part, the completion) ends within
    `part_seconds` of the last one, or the upload fails as the store being unavailable and is aborted, however
    slowly the bytes still flow."""
    bucket = s3.new_bucket()
    store = await _connect(s3.endpoint, bucket)
    try:
        source = _parted(store, tmp_path)
        store.part_seconds = 0.5
        upload_part = store._client.upload_part

        async def slow_second(**kwargs: Any) -> Any:
            if kwargs["PartNumber"] == 2:
                await asyncio.sleep(30)
            return await upload_part(**kwargs)

        monkeypatch.setattr(store._client, "upload_part", slow_second)
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError, match=r"took over 0\.5 s"):
            await store.put_file("backups/index.tar.gz", source, "application/gzip")
        assert time.monotonic() - started < 5
    finally:
        await store.close()
    assert _uploads(s3, bucket) == set()
    assert s3.keys(bucket) == []


async def test_the_local_store_s_sweep_removes_what_a_stopped_writer_left_in_staging(tmp_path, monkeypatch):
    """The embedded store's leftovers of an interrupted write are its staging files: removed when a store is opened
    (above), and by the sweep too, for a process that runs on."""
    store = LocalStore(tmp_path / "store")
    left = tmp_path / "store" / "tmp" / "tmpk2j3h4"
    left.write_bytes(b"half a backup")
    assert await store.remove_abandoned_writes("backups/") == 0
    assert left.exists()  # recent: perhaps another process's write in progress
    await asyncio.sleep(0.05)
    monkeypatch.setattr(local, "STALE_STAGING_SECONDS", 0)
    assert await store.remove_abandoned_writes("backups/") == 1
    assert not left.exists()
    await store.close()


async def test_an_s3_download_longer_than_the_timeout_goes_through_while_bytes_flow(s3, tmp_path):
    """R2_TIMEOUT_SECONDS bounds each silence, not a whole transfer: over a link passing the store's answers 256 KiB
    every 0.1 s, a 4 MiB download takes well over the timeout, and goes through, streamed to a file or read whole."""
    data = os.urandom(4 * 1024 * 1024)
    async with trickling(s3.endpoint, 256 * 1024, 0.1) as endpoint:
        store = await _connect(endpoint, s3.new_bucket(), STALL_SECONDS)
        try:
            await store.put("images/originals/slow.png", data, "image/png")
            started = time.monotonic()
            assert await store.get_file("images/originals/slow.png", tmp_path / "slow.png") == len(data)
            streamed = time.monotonic()
            assert (await store.get("images/originals/slow.png")).data == data
            assert min(streamed - started, time.monotonic() - streamed) > STALL_SECONDS
        finally:
            await store.close()
    assert (tmp_path / "slow.png").read_bytes() == data


async def test_as_many_s3_calls_as_an_indexing_processor_makes_at_once_go_through_together(s3):
    """R2_MAX_CONNECTIONS' default holds a process's concurrent calls: an indexing processor's 8 uploads and 16
    downloads at once, each longer than R2_TIMEOUT_SECONDS over a slow link, all go through in about one's time.
    With botocore's pool of 10, the others waited for a free connection, and failed as the store unavailable once
    that wait reached the timeout, though the store answered."""
    bucket = s3.new_bucket()
    data = os.urandom(1024 * 1024)
    keys = [f"images/originals/{number}.png" for number in range(8 + 16)]
    for key in keys:
        s3.client.put_object(Bucket=bucket, Key=key, Body=data)
    async with trickling(s3.endpoint, 64 * 1024, 0.1) as endpoint:
        store = await _connect(endpoint, bucket, STALL_SECONDS)
        try:
            started = time.monotonic()
            await store.get(keys[0])
            one = time.monotonic() - started
            started = time.monotonic()
            results = await asyncio.gather(*(store.get(key) for key in keys))
            together = time.monotonic() - started
        finally:
            await store.close()
    assert one > STALL_SECONDS
    assert all(result.data == data for result in results)
    assert together < 2 * one
