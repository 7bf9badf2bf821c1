"""Session-wide real components: one RabbitMQ node, one S3 server, tiny models built once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.logging import configure_logging
from infra.settings import Settings
from models.tiny import clip as tiny_clip
from tests.support.alone import MARK, held, lock_dir
from tests.support.rabbitmq import RabbitNode
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server

configure_logging("warning", "console")


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    tiny_clip.ensure(cache)
    return cache


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def make_env(
    rabbit: RabbitNode, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., dict[str, str]]:
    """Environment for one isolated deployment: its own vhost, storage dir and Qdrant path."""

    def build(r2_bucket: str | None = None, endpoint: str | None = None, **overrides: str) -> dict[str, str]:
        name = f"t{uuid.uuid4().hex[:10]}"
        root = tmp_path_factory.mktemp(name)
        env = {
            "AMQP_URL": rabbit.add_vhost(name),
            "MODEL_PROFILE": "tiny",
            "MODEL_CACHE_DIR": str(model_cache),
            "LOCAL_STORAGE_DIR": str(root / "storage"),
            "IMAGE_SEARCH_DB_PATH": str(root / "qdrant"),
            "IMAGE_SEARCH_FILES_DIR": str(root / "scratch"),
            "IMAGE_ENABLED": "0",
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "warning",
            "SYNC_TIMEOUT_SECONDS": "30",
            "PROCESSOR_METRICS_PORT": "0",
        }
        if r2_bucket is not None:
            env.update(
                R2_ENABLED="1",
                R2_ENDPOINT_URL=endpoint or "",
                R2_BUCKET_NAME=r2_bucket,
                R2_ACCESS_KEY_ID=ACCESS_KEY,
                R2_SECRET_ACCESS_KEY=SECRET_KEY,
                R2_REGION="us-east-1",
            )
        env.update(overrides)
        env["VHOST"] = name
        return env

    return build


@pytest.fixture(scope="session")
def make_settings(make_env: Callable[..., dict[str, str]]) -> SettingsFactory:
    def build(**kwargs: str) -> Settings:
        return Settings.from_env(make_env(**kwargs))

    return build


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """Each phase's report on the test item (`report_setup`, `report_call`), for fixtures that act on a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """Each test but an `alone` one holds the shared lock through its setup, call and teardown."""
    if item.get_closest_marker(MARK) is not None:
        return (yield)
    with held(lock_dir(item.config), exclusive=False):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[object]:
    """An `alone` test's call runs once no other worker is in a test (its fixtures are set up beside them)."""
    if item.get_closest_marker(MARK) is None:
        return (yield)
    with held(lock_dir(item.config), exclusive=True):
        return (yield)
