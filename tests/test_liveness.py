"""Heartbeats on a store that refuses them for good (a token scoped to other prefixes, a bucket policy): the
heartbeat keeps beating and says so, and a look that cannot read one finds no living run, as before processors
had heartbeats (processor/liveness.py). The looks themselves: tests/test_connection_losses.py."""

from __future__ import annotations

import pytest
import structlog

from infra.storage import StorageError
from infra.storage.local import LocalStore
from processor import liveness
from tests.support.amqp import wait_until


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStore:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    return LocalStore(tmp_path / "store")


async def test_a_refused_heartbeat_write_is_logged_and_the_heartbeat_beats_on(store, monkeypatch):
    put, refusals = store.put, []

    async def refusing_once(key: str, *args: object, **kwargs: object) -> str:
        if not refusals:
            refusals.append(key)
            raise StorageError("access denied to processor/alive/")
        return await put(key, *args, **kwargs)

    monkeypatch.setattr(store, "put", refusing_once)
    heartbeat = liveness.Heartbeat(store, "a1")
    heartbeat.start()
    try:
        with structlog.testing.capture_logs() as logs:
            heartbeat.running("a1.0")
            await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)
        assert refusals == [liveness.heartbeat_key("a1")]
        assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["heartbeat_not_written"]
    finally:
        await heartbeat.stop()


async def test_a_heartbeat_that_cannot_be_read_is_no_living_run(store, monkeypatch):
    there, here = liveness.Heartbeat(store, "a1"), liveness.Heartbeat(store, "b2")
    there.start()
    try:
        there.running("a1.0")
        await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)

        async def refused(key: str) -> object:
            raise StorageError("access denied to processor/alive/")

        monkeypatch.setattr(store, "get", refused)
        with structlog.testing.capture_logs() as logs:
            assert (await here.look(["a1.0"], {})).living == ()
        assert [entry["event"] for entry in logs] == ["heartbeat_not_read"]
    finally:
        monkeypatch.undo()
        await there.stop()
