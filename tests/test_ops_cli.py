"""The operator CLI against a real RabbitMQ (dead letters) and a real API + processor over moto S3 (backfill)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import msgspec
import pytest
from click.testing import CliRunner, Result

from contract.errors import ErrorInfo
from contract.events import JobFinishedV1, job_finished
from contract.image_ids import image_id_for_key, thumbnail_key
from contract.jobs import WITHDRAWN, JobRecord, JobStore
from infra.broker import EVENTS_EXCHANGE
from infra.settings import Settings
from infra.storage.local import LocalStore
from infra.vectors.edge.layout import EngineLayout
from processor.announcer import OWED_PREFIX
from processor.ops.__main__ import cli
from processor.ops.backfill import plan_backfill
from processor.ops.events import binding_keys, event_line
from processor.ops.filters import Selection
from processor.ops.letters import DeadLetter
from processor.ops.render import body_text, letters_json, letters_table
from processor.runtime import Runtime
from tests.support.amqp import wait_until
from tests.support.dlq import Letter, depth, peek, reset_and_seed
from tests.support.images import encoded
from tests.support.rabbitmq import free_port
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parent.parent
MINUTE, HOUR, DAY = dt.timedelta(minutes=1), dt.timedelta(hours=1), dt.timedelta(days=1)
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(92)
POISON_BODY = b"\xff\xfe\x00not a job"

LETTERS = [
    Letter(
        "idx-old",
        "image.index",
        "storage_unavailable",
        5,
        3 * DAY,
        {"key": "images/incoming/a.png", "source": "upstream"},
        priority=4,
        reply_to="amq.gen-requester",
        correlation_id="corr-1",
        extra_headers={"x-custom": "kept"},
    ),
    Letter(
        "idx-new",
        "image.index",
        "storage_unavailable",
        5,
        10 * MINUTE,
        {"data": PNG_BYTES, "source": "upload"},
        content_type="application/msgpack",
    ),
    Letter("gen-1", "image.generate", "model_error", 1, 2 * HOUR, {"prompt": "a red cat"}),
    Letter(
        "voice-1",
        "voice.generate",
        "feature_disabled",
        1,
        1 * HOUR,
        {"text": "hello", "reference": b"RIFF" + bytes(40)},
        content_type="application/msgpack",
    ),
    # a message that arrived without a type (aio-pika gives every message it publishes a message id, so the
    # processor's dead letters always have one; a letter without one is covered by test_missing_fields_show_a_dash)
    Letter(
        "poison-1",
        None,
        "unknown_type",
        1,
        5 * DAY,
        POISON_BODY,
        content_type="application/octet-stream",
        routing_key="mystery.job",
    ),
]
ALL_IDS = ["idx-old", "idx-new", "gen-1", "voice-1", "poison-1"]


@pytest.fixture(scope="module")
def env(make_env) -> dict[str, str]:
    return make_env(AMQP_CONNECT_TIMEOUT_SECONDS="5")


@pytest.fixture
def amqp_url(env) -> str:
    """the job queues empty and ams.dead holding LETTERS, in that order."""
    asyncio.run(reset_and_seed(env["AMQP_URL"], LETTERS, dt.datetime.now(tz=dt.UTC)))
    return env["AMQP_URL"]


def ams_ops(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def queued(amqp_url: str, queue: str) -> list:
    return asyncio.run(peek(amqp_url, queue))


def queued_ids(amqp_url: str, queue: str) -> list[str | None]:
    return [message.message_id for message in queued(amqp_url, queue)]


def test_every_command_has_help_and_the_exit_codes():
    commands = ([], ["dlq"], ["dlq", "list"], ["dlq", "show"], ["dlq", "replay"], ["dlq", "purge"], ["backfill"])
    jobs = (["jobs"], ["jobs", "list"], ["jobs", "show"], ["jobs", "cancel"], ["jobs", "delete-output"])
    jobs += (["events"], ["events", "watch"])
    jobs += (["callbacks"], ["callbacks", "send"])
    for command in (*commands, *jobs):
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.stdout
        assert "Exit codes:" in result.stdout
        assert "2  usage or configuration error" in result.stdout


def test_list_shows_every_dead_letter_and_leaves_the_queue_as_it_was(env, amqp_url):
    result = ams_ops(env, "dlq", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MESSAGE", "ID", "TYPE", "REASON", "ATTEMPTS", "FIRST", "FAILURE", "LAST", "FAILURE"]
    rows = [line.split() for line in lines[1:6]]
    assert [row[0] for row in rows] == ALL_IDS
    assert rows[0][1:4] == ["image.index", "storage_unavailable", "5"]
    assert rows[4][1:4] == ["-", "unknown_type", "1"]
    assert rows[0][4].endswith("Z") and rows[0][5].endswith("Z")
    assert lines[-1] == "5 of 5 dead letters in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS
    assert asyncio.run(depth(amqp_url, "ams.dead")) == 5


def test_list_json_and_filters(env, amqp_url):
    result = ams_ops(env, "dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    letters = json.loads(result.stdout)
    assert [letter["message_id"] for letter in letters] == ALL_IDS
    first = letters[0]
    assert first["type"] == first["routing_key"] == "image.index"
    assert (first["reason_code"], first["reason"], first["attempts"]) == (
        "storage_unavailable",
        "storage_unavailable happened",
        5,
    )
    assert first["first_failed_at"] < first["last_failed_at"]
    assert first["content_type"] == "application/json"
    assert first["size"] == len(LETTERS[0].encoded_body())
    assert letters[4]["routing_key"] == "mystery.job"

    by_type = json.loads(ams_ops(env, "dlq", "list", "--json", "--type", "image.index").stdout)
    assert [letter["message_id"] for letter in by_type] == ["idx-old", "idx-new"]
    recent = json.loads(ams_ops(env, "dlq", "list", "--json", "--since", "90m").stdout)
    assert [letter["message_id"] for letter in recent] == ["idx-new", "voice-1"]
    none = ams_ops(env, "dlq", "list", "--reason", "no_such_reason")
    assert none.exit_code == 0
    assert none.stdout.strip() == "no dead letters match (5 in ams.dead)"
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS


def test_show_pretty_prints_json_and_msgpack_bodies(env, amqp_url):
    shown = ams_ops(env, "dlq", "show", "idx-old")
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert "reason         storage_unavailable: storage_unavailable happened" in text
    assert "  reply_to: amq.gen-requester" in text
    assert "  priority: 4" in text
    assert "  x-ams-attempts: 5" in text
    assert "  x-custom: kept" in text
    assert f"body (application/json, {len(LETTERS[0].encoded_body())} bytes)" in text
    assert '{\n  "key": "images/incoming/a.png",\n  "source": "upstream"\n}' in text

    packed = ams_ops(env, "dlq", "show", "idx-new").stdout
    assert f'  "data": "<{len(PNG_BYTES)} bytes>",\n  "source": "upload"' in packed
    assert "body (application/msgpack" in packed
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS


def test_show_previews_a_body_that_is_not_a_job(env, amqp_url):
    shown = ams_ops(env, "dlq", "show", "poison-1").stdout
    assert "type           -" in shown
    assert "routing key    mystery.job" in shown
    assert f"body (application/octet-stream, {len(POISON_BODY)} bytes)\n(binary, first bytes in hex)" in shown
    assert "00000000  ff fe 00 6e 6f 74" in shown


def test_missing_fields_show_a_dash():
    letter = DeadLetter(
        position=2,
        message_id=None,
        type=None,
        routing_key="",
        reason_code="missing_message_id",
        reason=None,
        attempts=None,
        first_failed_at=None,
        last_failed_at=None,
        content_type=None,
        properties={},
        headers={},
        body=b"{}",
    )
    assert letters_table([letter]).splitlines()[1].split() == ["-", "-", "missing_message_id", "-", "-", "-"]
    assert letter.label == "#3 (no message id)"
    assert letters_json([letter]).count("null") == 7
    assert not Selection(ids=frozenset({"x"})).matches(letter)
    assert not Selection(since=dt.datetime.now(tz=dt.UTC)).matches(letter)
    assert Selection().matches(letter)


@pytest.mark.parametrize("content_type", ["application/json", "application/msgpack"])
def test_a_body_nested_too_deeply_to_decode_is_previewed(content_type):
    body = b"[" * 100_000 + b"]" * 100_000 if content_type == "application/json" else b"\x91" * 100_000 + b"\x01"
    letter = DeadLetter(
        position=0,
        message_id="deep",
        type="bucket.event",
        routing_key="bucket.event",
        reason_code="malformed_body",
        reason="nested too deeply",
        attempts=1,
        first_failed_at=None,
        last_failed_at=None,
        content_type=content_type,
        properties={},
        headers={},
        body=body,
    )
    shown = body_text(letter)
    assert shown.startswith(f"(does not decode as {content_type}: nested too deeply)\n")


def test_show_unknown_id_fails_with_one_line(env, amqp_url):
    result = ams_ops(env, "dlq", "show", "no-such-id")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "ams-ops: no dead letter with message id 'no-such-id' (5 in ams.dead)\n"


def test_replay_by_type_republishes_the_job_with_fresh_attempts(env, amqp_url):
    result = ams_ops(env, "dlq", "replay", "--type", "image.index")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "replayed 2, left 3 in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ["gen-1", "voice-1", "poison-1"]

    jobs = {message.message_id: message for message in queued(amqp_url, "ams.index")}
    assert set(jobs) == {"idx-old", "idx-new"}
    old = jobs["idx-old"]
    assert old.type == old.routing_key == "image.index"
    assert old.exchange == "ams.jobs"
    assert (old.content_type, old.priority, old.delivery_mode) == ("application/json", 4, 2)
    assert old.body == LETTERS[0].encoded_body()
    assert old.reply_to is None and old.correlation_id is None
    headers = old.headers
    assert not {"x-ams-attempts", "ams-retry-delay", "x-ams-retry-delay"} & set(headers)
    assert headers["x-custom"] == "kept"
    assert headers["x-ams-reason-code"] == "storage_unavailable"
    replayed_at = dt.datetime.fromisoformat(headers["x-ams-replayed-at"])
    assert abs(dt.datetime.now(tz=dt.UTC) - replayed_at) < MINUTE
    new = jobs["idx-new"]
    assert new.content_type == "application/msgpack"
    assert msgspec.msgpack.decode(new.body) == {"data": PNG_BYTES, "source": "upload"}


def test_replay_by_reason_id_and_since(env, amqp_url):
    assert ams_ops(env, "dlq", "replay", "--reason", "feature_disabled").stdout.strip() == (
        "replayed 1, left 4 in ams.dead"
    )
    assert queued_ids(amqp_url, "ams.voice") == ["voice-1"]
    assert ams_ops(env, "dlq", "replay", "--id", "gen-1", "--id", "idx-old").stdout.strip() == (
        "replayed 2, left 2 in ams.dead"
    )
    assert queued_ids(amqp_url, "ams.image") == ["gen-1"]
    assert queued_ids(amqp_url, "ams.index") == ["idx-old"]
    since = (dt.datetime.now(tz=dt.UTC) - 2 * DAY).isoformat()
    assert ams_ops(env, "dlq", "replay", "--since", since).stdout.strip() == "replayed 1, left 1 in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ["poison-1"]
    assert len(queued(amqp_url, "ams.index")) == 2


def test_replay_dry_run_changes_nothing(env, amqp_url):
    result = ams_ops(env, "dlq", "replay", "--since", "3h", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["idx-new", "gen-1", "voice-1"]
    assert lines[-1] == "would replay 3, leave 2 in ams.dead"
    assert result.stderr == ""
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS
    assert asyncio.run(depth(amqp_url, "ams.index")) == 0


def test_replay_all_moves_every_letter_to_its_queue_poison_included(env, amqp_url):
    result = ams_ops(env, "dlq", "replay", "--all")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "replayed 5, left 0 in ams.dead"
    assert result.stderr == ""
    [poison] = queued(amqp_url, "ams.unrouted")
    assert (poison.message_id, poison.type, poison.routing_key, poison.body) == (
        "poison-1",
        None,
        "mystery.job",
        POISON_BODY,
    )
    assert sorted(queued_ids(amqp_url, "ams.index")) == ["idx-new", "idx-old"]
    assert queued_ids(amqp_url, "ams.image") == ["gen-1"]
    assert queued_ids(amqp_url, "ams.voice") == ["voice-1"]


@pytest.mark.parametrize("command", ["replay", "purge"])
def test_replay_and_purge_need_a_filter_or_all(env, amqp_url, command):
    result = ams_ops(env, "dlq", command)
    assert result.exit_code == 2
    assert "say which dead letters" in result.stderr
    both = ams_ops(env, "dlq", command, "--all", "--type", "image.index")
    assert both.exit_code == 2
    assert asyncio.run(depth(amqp_url, "ams.dead")) == 5


def test_purge_asks_first_and_deletes_only_the_matching(env, amqp_url):
    declined = ams_ops(env, "dlq", "purge", "--reason", "storage_unavailable", input="n\n")
    assert declined.exit_code == 0, declined.output
    assert "Delete 2 dead letters? [y/N]" in declined.stderr
    assert declined.stdout.strip() == "deleted 0, left 5 in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS

    dry = ams_ops(env, "dlq", "purge", "--type", "image.generate", "--dry-run")
    assert dry.stdout.splitlines()[-1] == "would delete 1, leave 4 in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS

    confirmed = ams_ops(env, "dlq", "purge", "--reason", "storage_unavailable", input="y\n")
    assert confirmed.stdout.strip() == "deleted 2, left 3 in ams.dead"
    assert ams_ops(env, "dlq", "purge", "--id", "voice-1", "--yes").stdout.strip() == "deleted 1, left 2 in ams.dead"
    assert queued_ids(amqp_url, "ams.dead") == ["gen-1", "poison-1"]
    assert asyncio.run(depth(amqp_url, "ams.index")) == 0


def test_bad_since_is_a_usage_error(env):
    result = ams_ops(env, "dlq", "list", "--since", "yesterday")
    assert result.exit_code == 2
    assert "neither an ISO-8601 time" in result.stderr


def _run_module(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.ops", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_broker_is_one_clear_line_and_exit_1():
    port = free_port()
    env = {"AMQP_URL": f"amqp://guest:s3cret@127.0.0.1:{port}/", "AMQP_CONNECT_TIMEOUT_SECONDS": "0"}
    result = _run_module(env, "dlq", "list")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"ams-ops: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port} (AMQP_URL)")
    assert "s3cret" not in result.stderr


def test_bad_configuration_exits_2():
    result = _run_module({"AMQP_URL": "http://rabbit:5672/"}, "dlq", "list")
    assert result.returncode == 2
    assert result.stderr.startswith("ams-ops: configuration error: AMQP_URL=")
    assert len(result.stderr.splitlines()) == 1


def test_the_cli_imports_no_model_code():
    probe = (
        "import json, sys, processor.ops.__main__\n"
        "sys.stdout.write(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"torch", "diffusers", "open_clip", "qwen_tts", "transformers", "api", "PIL"}


def _stamp(ago: dt.timedelta) -> str:
    return (dt.datetime.now(tz=dt.UTC) - ago).isoformat().replace("+00:00", "Z")


def _record(job_id: str, job_type: str, status: str, ago: dt.timedelta, **fields) -> JobRecord:
    record = JobStore.new(job_id, job_type, {"prompt": job_id})
    record.status, record.created_at, record.updated_at = status, _stamp(ago), _stamp(ago)
    if status in ("succeeded", "failed"):
        record.finished_at = record.updated_at
    for name, value in fields.items():
        setattr(record, name, value)
    return record


DOWN = ErrorInfo(code="storage_unavailable", message="down")
JOB_RECORDS = [
    _record("stuck", "image.generate", "queued", 2 * HOUR),
    _record("waiting", "voice.generate", "queued", MINUTE),
    _record("retrying", "image.generate", "queued", MINUTE, attempts=1, last_error=DOWN),
    _record("busy", "voice.generate", "running", MINUTE, attempts=1),
    _record("done", "image.generate", "succeeded", HOUR, attempts=1, result={"key": "images/generated/done.png"}),
    _record("gone", "image.generate", "failed", HOUR, error=ErrorInfo(code=WITHDRAWN, message="the broker blocked")),
    _record("expired", "image.generate", "succeeded", 30 * DAY, attempts=1),
]


def _seeded(env: dict[str, str]) -> dict[str, str]:
    async def seed() -> None:
        jobs = JobStore(LocalStore(Path(env["LOCAL_STORAGE_DIR"])), ttl_days=7)
        for record in JOB_RECORDS:
            await jobs.create(record)

    asyncio.run(seed())
    return env


@pytest.fixture(scope="module")
def jobs_env(make_env) -> dict[str, str]:
    return _seeded(make_env())


@pytest.fixture
def cancel_env(make_env) -> dict[str, str]:
    """JOB_RECORDS in a store of the test's own: cancelling changes them."""
    return _seeded(make_env())


def _listed(result: Result) -> list[str]:
    return [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip() and " of " not in line]


def test_jobs_list_shows_every_record_not_expired_oldest_first(jobs_env):
    result = ams_ops(jobs_env, "jobs", "list")
    assert result.exit_code == 0, result.output
    header = ["JOB", "ID", "TYPE", "STATUS", "CODE", "ATTEMPTS", "CREATED", "UPDATED"]
    assert result.stdout.splitlines()[0].split() == header
    assert _listed(result) == ["stuck", "done", "gone", "waiting", "retrying", "busy"]
    assert result.stdout.rstrip().endswith("6 of 6 job records")
    assert "storage_unavailable" in result.stdout and WITHDRAWN in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--status", "queued", "--updated-before", "1h"], ["stuck"]),
        (["--status", "queued"], ["stuck", "waiting", "retrying"]),
        (["--code", WITHDRAWN], ["gone"]),
        (["--code", "storage_unavailable", "--code", WITHDRAWN], ["gone", "retrying"]),
        (["--type", "voice.generate"], ["waiting", "busy"]),
        (["--status", "running", "--status", "succeeded"], ["done", "busy"]),
    ],
)
def test_jobs_list_filters(jobs_env, args, expected):
    result = ams_ops(jobs_env, "jobs", "list", *args)
    assert result.exit_code == 0, result.output
    assert _listed(result) == expected
    assert result.stdout.rstrip().endswith(f"{len(expected)} of 6 job records")


def test_jobs_list_json_and_nothing_matching(jobs_env):
    result = ams_ops(jobs_env, "jobs", "list", "--json", "--status", "failed")
    assert result.exit_code == 0, result.output
    (gone,) = json.loads(result.stdout)
    assert (gone["job_id"], gone["error"]["code"]) == ("gone", WITHDRAWN)
    none = ams_ops(jobs_env, "jobs", "list", "--type", "image.index")
    assert (none.exit_code, none.stdout.strip()) == (0, "no job records match (6 in all)")
    assert json.loads(ams_ops(jobs_env, "jobs", "list", "--json", "--type", "image.index").stdout) == []


def test_jobs_show_prints_one_record_and_fails_for_an_unknown_or_expired_id(jobs_env):
    result = ams_ops(jobs_env, "jobs", "show", "done")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"] == {"key": "images/generated/done.png"}
    for job_id in ("nope", "expired"):
        missing = ams_ops(jobs_env, "jobs", "show", job_id)
        assert missing.exit_code == 1
        assert missing.stderr == f"ams-ops: no job record with id {job_id!r}\n"


def _codes(env: dict[str, str]) -> dict[str, str | None]:
    listed = json.loads(ams_ops(env, "jobs", "list", "--json").stdout)
    return {job["job_id"]: (job["error"] or {}).get("code") for job in listed}


def test_jobs_cancel_by_id_cancels_the_queued_ones_and_says_why_not_the_others(cancel_env):
    result = ams_ops(cancel_env, "jobs", "cancel", "waiting", "busy", "done")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "job busy cannot be cancelled (it is running); only a queued job can",
        "job done cannot be cancelled (it is succeeded); only a queued job can",
        "cancelled 1, 2 not cancellable",
    ]
    codes = _codes(cancel_env)
    assert (codes["waiting"], codes["busy"], codes["done"], codes["stuck"]) == ("cancelled", None, None, None)
    again = ams_ops(cancel_env, "jobs", "cancel", "waiting")
    assert (again.exit_code, again.stdout.strip()) == (0, "cancelled 0, 1 cancelled already")
    unknown = ams_ops(cancel_env, "jobs", "cancel", "stuck", "nope")
    assert unknown.exit_code == 1
    assert "no job record with id 'nope'" in unknown.stderr
    assert _codes(cancel_env)["stuck"] == "cancelled"  # the ids before it were cancelled


async def _events_queue(amqp_url: str) -> str:
    """A subscriber's durable queue bound to every job event (it outlives the connection that declared it)."""
    name = f"test.events.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # a subscriber that may start before any server declares the exchange as they do (topic, durable)
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, routing_key="#")
    return name


def test_jobs_cancel_announces_each_cancellation(cancel_env):
    events = asyncio.run(_events_queue(cancel_env["AMQP_URL"]))
    result = ams_ops(cancel_env, "jobs", "cancel", "waiting", "stuck", "done")
    assert result.exit_code == 0, result.output
    announced = [json.loads(message.body) for message in queued(cancel_env["AMQP_URL"], events)]
    assert sorted((event["job_id"], event["status"], event["error"]["code"]) for event in announced) == [
        ("stuck", "failed", "cancelled"),
        ("waiting", "failed", "cancelled"),
    ]


def test_jobs_cancel_without_rabbitmq_owes_the_events_to_the_store(cancel_env):
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    env = {**cancel_env, "AMQP_URL": nowhere, "AMQP_CONNECT_TIMEOUT_SECONDS": "1"}
    result = ams_ops(env, "jobs", "cancel", "waiting")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "cancelled 1 (1 job events owed: RabbitMQ unreachable; a processor publishes them)"
    )

    async def owed() -> list[bytes]:
        store = LocalStore(Path(env["LOCAL_STORAGE_DIR"]))
        return [(await store.get(info.key)).data async for info in store.list(OWED_PREFIX)]

    (event,) = asyncio.run(owed())
    assert json.loads(event)["event"]["job_id"] == "waiting"


def test_jobs_cancel_by_filters_asks_first_and_dry_run_changes_nothing(cancel_env):
    dry = ams_ops(cancel_env, "jobs", "cancel", "--type", "image.generate", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert _listed(dry) == ["stuck", "retrying", "would"]
    assert dry.stdout.rstrip().endswith("would cancel 2 queued jobs")
    assert "cancelled" not in _codes(cancel_env).values()
    old = ams_ops(cancel_env, "jobs", "cancel", "--updated-before", "1h", "--yes")
    assert (old.exit_code, old.stdout.strip()) == (0, "cancelled 1")
    declined = ams_ops(cancel_env, "jobs", "cancel", "--all", input="n\n")
    assert (declined.exit_code, declined.stdout.strip()) == (0, "cancelled 0")
    assert "Cancel 2 queued jobs?" in declined.stderr
    everything = ams_ops(cancel_env, "jobs", "cancel", "--all", "--yes")
    assert (everything.exit_code, everything.stdout.strip()) == (0, "cancelled 2")
    codes = _codes(cancel_env)
    assert [job for job, code in codes.items() if code == "cancelled"] == ["stuck", "waiting", "retrying"]


@pytest.mark.parametrize(
    "args", [[], ["stuck", "--all"], ["stuck", "--type", "image.generate"], ["--all", "--updated-before", "1h"]]
)
def test_jobs_cancel_needs_ids_or_filters_not_both(cancel_env, args):
    result = ams_ops(cancel_env, "jobs", "cancel", *args)
    assert result.exit_code == 2, result.output
    assert "cancelled" not in _codes(cancel_env).values()


def _with_outputs(env: dict[str, str]) -> LocalStore:
    """The outputs of `done` and of a voice clone finished 2 minutes ago, in the seeded store."""
    store = LocalStore(Path(env["LOCAL_STORAGE_DIR"]))
    spoken = _record("spoken", "voice.generate", "succeeded", 2 * MINUTE, result={"key": "voice/generated/spoken.mp3"})

    async def put() -> None:
        await JobStore(store, 7).create(spoken)
        await store.put("images/generated/done.png", b"png", "image/png")
        await store.put("voice/generated/spoken.mp3", b"mp3", "audio/mpeg")

    asyncio.run(put())
    return store


def _there(store: LocalStore, *keys: str) -> list[bool]:
    async def check() -> list[bool]:
        return [await store.exists(key) for key in keys]

    return asyncio.run(check())


OUTPUTS = ("images/generated/done.png", "voice/generated/spoken.mp3")


def test_jobs_delete_output_by_id_deletes_and_says_why_not_the_others(cancel_env):
    store = _with_outputs(cancel_env)
    result = ams_ops(cancel_env, "jobs", "delete-output", "done", "busy", "gone")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "job busy has no output to delete: it is running; wait until it has finished",
        "job gone has no output to delete: it failed",
        "deleted 1, 2 without an output",
    ]
    assert _there(store, *OUTPUTS) == [False, True]
    assert json.loads(ams_ops(cancel_env, "jobs", "show", "done").stdout)["output_deleted"]["reason"] == "deleted"
    again = ams_ops(cancel_env, "jobs", "delete-output", "done")
    assert (again.exit_code, again.stdout.strip()) == (0, "deleted 0, 1 deleted already")
    unknown = ams_ops(cancel_env, "jobs", "delete-output", "spoken", "nope")
    assert unknown.exit_code == 1
    assert "no job record with id 'nope'" in unknown.stderr
    assert _there(store, *OUTPUTS) == [False, False]  # the ids before it were done


def test_jobs_delete_output_by_filters_asks_first_and_dry_run_changes_nothing(cancel_env):
    store = _with_outputs(cancel_env)
    dry = ams_ops(cancel_env, "jobs", "delete-output", "--all", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert _listed(dry) == ["done", "spoken", "would"]
    assert dry.stdout.rstrip().endswith("would delete 2 outputs")
    declined = ams_ops(cancel_env, "jobs", "delete-output", "--updated-before", "30m", input="n\n")
    assert (declined.exit_code, declined.stdout.strip()) == (0, "deleted 0")
    assert "Delete the outputs of 1 jobs?" in declined.stderr
    assert _there(store, *OUTPUTS) == [True, True]
    voices = ams_ops(cancel_env, "jobs", "delete-output", "--type", "voice.generate", "--yes")
    assert (voices.exit_code, voices.stdout.strip()) == (0, "deleted 1")
    assert _there(store, *OUTPUTS) == [True, False]
    everything = ams_ops(cancel_env, "jobs", "delete-output", "--all", "--yes")
    assert (everything.exit_code, everything.stdout.strip()) == (0, "deleted 1")
    assert _there(store, *OUTPUTS) == [False, False]
    nothing = ams_ops(cancel_env, "jobs", "delete-output", "--all", "--yes")
    assert (nothing.exit_code, nothing.stdout.strip()) == (0, "deleted 0")


@pytest.mark.parametrize("args", [[], ["done", "--all"], ["done", "--type", "image.generate"]])
def test_jobs_delete_output_needs_ids_or_filters_not_both(cancel_env, args):
    store = _with_outputs(cancel_env)
    result = ams_ops(cancel_env, "jobs", "delete-output", *args)
    assert result.exit_code == 2, result.output
    assert _there(store, *OUTPUTS) == [True, True]


def test_jobs_list_with_no_records(make_env):
    result = ams_ops(make_env(), "jobs", "list")
    assert (result.exit_code, result.stdout.strip()) == (0, "no job records")


def test_jobs_with_the_store_unreachable_fail_with_one_line(make_env):
    env = make_env(r2_bucket="nowhere", endpoint=f"http://127.0.0.1:{free_port()}")
    result = _run_module(env, "jobs", "list")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ams-ops: object store not usable:")
    assert len(result.stderr.splitlines()) == 1


async def ams_ops_started(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """The CLI started as its own process, so the API running in this event loop can answer it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "processor.ops",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def ams_ops_process(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The CLI run to its end as its own process."""
    process = await ams_ops_started(env, *args)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


REFUSED = ", skipped (a key not indexed or over IMAGE_SEARCH_MAX_BYTES) 2"


async def test_backfill_publishes_each_unindexed_image_once(make_env, s3):
    bucket = s3.new_bucket()
    env = make_env(r2_bucket=bucket, endpoint=s3.endpoint, IMAGE_SEARCH_MAX_BYTES="200000")
    settings = Settings.from_env(env)
    images = {f"images/incoming/photo-{n}.png": encoded(n, "PNG") for n in range(3)}
    images["images/incoming/scans/old.JPG"] = encoded(7, "JPEG")
    for key, data in images.items():
        s3.client.put_object(Bucket=bucket, Key=key, Body=data)
    s3.client.put_object(Bucket=bucket, Key="images/incoming/readme.txt", Body=b"not an image")
    s3.client.put_object(Bucket=bucket, Key="images/elsewhere/other.png", Body=encoded(8, "PNG"))
    # what the processor would refuse is not published: a key it does not index, an object over the limit
    s3.client.put_object(Bucket=bucket, Key="images/incoming/scans\\page.png", Body=encoded(9, "PNG"))
    s3.client.put_object(Bucket=bucket, Key="images/incoming/huge.png", Body=encoded(10, "PNG") + bytes(300_000))
    ids = {key: image_id_for_key(bucket, key) for key in images}
    backfill = ("backfill", "--prefix", "images/incoming/")

    # the API alone, beside the index's owner that consumes nothing: what the backfill publishes stays in ams.index
    owner = await Runtime.open(settings, capabilities=("index",))
    try:
        async with running_server(settings, with_processor=False) as api:
            api_env = {**env, "AMS_API_URL": api.base_url}
            code, out, err = await ams_ops_process(api_env, *backfill, "--dry-run")
            assert code == 0, err
            assert out.strip() == f"would publish 4, already indexed 0, skipped (not images) 1{REFUSED}"
            assert await depth(env["AMQP_URL"], "ams.index") == 0

            code, out, err = await ams_ops_process(api_env, *backfill)
            assert code == 0, err
            assert out.strip() == f"published 4, already indexed 0, skipped (not images) 1{REFUSED}"
            jobs = await peek(env["AMQP_URL"], "ams.index")
            assert sorted(message.message_id for message in jobs) == sorted(ids.values())
            for message in jobs:
                key = next(key for key, image_id in ids.items() if image_id == message.message_id)
                assert json.loads(message.body) == {"key": key, "source": "backfill"}
                assert (message.type, message.routing_key, message.exchange) == (
                    "image.index",
                    "image.index",
                    "ams.jobs",
                )
                assert (message.content_type, message.priority, message.delivery_mode) == ("application/json", 0, 2)
    finally:
        await owner.close()

    # with the processor: the queued jobs get indexed, and a re-run publishes only what is new
    async with running_server(settings) as server:

        async def indexed(image_ids) -> bool:
            responses = [await server.client.get(f"/v1/images/{image_id}") for image_id in image_ids]
            return all(response.status_code == 200 for response in responses)

        await wait_until(lambda: indexed(ids.values()), timeout=60)
        record = (await server.client.get(f"/v1/images/{ids['images/incoming/photo-0.png']}")).json()
        assert record["r2_key"] == "images/incoming/photo-0.png"
        assert record["source"] == "backfill"

        server_env = {**env, "AMS_API_URL": server.base_url}
        code, out, err = await ams_ops_process(server_env, *backfill)
        assert code == 0, err
        assert out.strip() == f"published 0, already indexed 4, skipped (not images) 1{REFUSED}"

        late = "images/incoming/late.png"
        s3.client.put_object(Bucket=bucket, Key=late, Body=encoded(11, "PNG"))
        code, out, err = await ams_ops_process(server_env, *backfill, "--json")
        assert code == 0, err
        assert json.loads(out) == {
            "published": 1,
            "already_indexed": 4,
            "skipped_not_image": 1,
            "skipped_own": 0,
            "skipped_not_indexable": 2,
            "dry_run": False,
        }
        await wait_until(lambda: indexed([image_id_for_key(bucket, late)]), timeout=60)


async def test_backfill_with_the_api_down_fails_with_one_line(make_env, s3):
    bucket = s3.new_bucket()
    s3.client.put_object(Bucket=bucket, Key="images/incoming/a.png", Body=encoded(1, "PNG"))
    env = {**make_env(r2_bucket=bucket, endpoint=s3.endpoint), "AMS_API_URL": f"http://127.0.0.1:{free_port()}"}
    code, out, err = await ams_ops_process(env, "backfill", "--prefix", "images/incoming/")
    assert code == 1
    assert out == ""
    assert err.startswith("ams-ops: cannot reach the API at http://127.0.0.1:")
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "say what to backfill: --prefix PREFIX"),
        (("--thumbnails", "--prefix", "images/"), "--thumbnails works on the whole index"),
        (("--thumbnails", "--dry-run"), "--thumbnails works on the whole index"),
    ],
)
def test_backfill_needs_a_prefix_or_thumbnails_but_not_both(args, message):
    result = CliRunner().invoke(cli, ["backfill", *args])
    assert result.exit_code == 2
    assert message in result.output


async def test_backfill_thumbnails_makes_the_missing_ones_and_the_server_own_objects_are_never_published(make_env, s3):
    bucket = s3.new_bucket()
    env = make_env(r2_bucket=bucket, endpoint=s3.endpoint)
    async with running_server(Settings.from_env(env)) as server:
        records = []
        for seed in range(4):
            response = await server.client.post(
                "/v1/images", files={"file": (f"{seed}.png", encoded(900 + seed, "PNG", (640, 480)), "image/png")}
            )
            assert response.status_code == 201, response.text
            records.append(response.json())
        index = server.services.index
        for record in records[1:]:  # indexed before thumbnails existed: no flag, no thumbnail
            point = await index.get(record["id"])
            await index.upsert([(msgspec.structs.replace(point, thumbnail=False), await index.vector(record["id"]))])
            s3.client.delete_object(Bucket=bucket, Key=thumbnail_key(record["id"]))
        s3.client.delete_object(Bucket=bucket, Key=records[3]["r2_key"])  # and this one lost its original
        api_env = {**env, "AMS_API_URL": server.base_url}

        code, out, err = await ams_ops_process(api_env, "backfill", "--thumbnails", "--json")
        assert code == 0, err
        assert json.loads(out) == {
            "images": 4,
            "made": 2,
            "already_there": 1,
            "skipped": {"original_not_found": 1},
        }
        assert set(s3.keys(bucket, "images/thumbs/")) == {thumbnail_key(record["id"]) for record in records[:3]}

        code, out, err = await ams_ops_process(api_env, "backfill", "--thumbnails", "--concurrency", "2")
        assert code == 0, err
        assert out.strip() == "made 0, already there 3, skipped 1 (original_not_found 1)"

        plan = await plan_backfill(Settings.from_env(env), "images/")
        assert (plan.images, plan.skipped_not_image, plan.skipped_own) == ([], 0, 6)  # 3 originals, 3 thumbnails


async def test_events_watch_prints_each_job_end_as_it_is_announced(make_env):
    """The watch binds its own queue, sees the cancellation the API announces, and stops after --count."""
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0")
    async with running_server(Settings.from_env(env), with_processor=False) as api:
        watch = ("events", "watch", "--type", "image.generate", "--status", "failed", "--json", "--count", "1")
        process = await ams_ops_started(env, *watch)
        ready = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        assert ready.decode().startswith("watching ams.events (image.generate.failed)"), ready
        params = {"prompt": "watched", "width": 64, "height": 64, "steps": 2}
        job = (await api.client.post("/v1/jobs", json={"type": "image.generate", "params": params})).json()
        assert (await api.client.post(f"/v1/jobs/{job['job_id']}/cancel")).status_code == 200
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr
    (line,) = stdout.decode().splitlines()
    event = json.loads(line)
    assert (event["job_id"], event["status"], event["error"]["code"]) == (job["job_id"], "failed", "cancelled")


def test_events_watch_keys_and_lines():
    assert binding_keys([], []) == ["*.*.*"]
    assert binding_keys(["voice.generate"], []) == ["voice.generate.*"]
    assert binding_keys([], ["failed"]) == ["*.*.failed"]
    assert binding_keys(["image.generate", "image.index"], ["succeeded"]) == [
        "image.generate.succeeded",
        "image.index.succeeded",
    ]
    record = JobStore.new("8a3f2c1e-4b5d-4e6f-8a9b-0c1d2e3f4a5b", "image.generate", {"prompt": "x"})
    record.status, record.finished_at, record.attempts = "failed", "2026-12-07T15:00:00.000Z", 1
    record.error = ErrorInfo(code="cancelled", message="cancelled while queued")
    _, event = job_finished(record)
    assert event_line(event).split() == [
        "2026-12-07T15:00:00.000Z",
        "8a3f2c1e-4b5d-4e6f-8a9b-0c1d2e3f4a5b",
        "image.generate",
        "failed",
        "cancelled",
    ]


@pytest.mark.parametrize("command", [["backup"], ["restore"], ["restore", "--force"]])
def test_index_backup_and_restore_with_a_qdrant_server_exit_2_and_touch_nothing(make_env, command):
    """A Qdrant server keeps its own data: refused before the server (here unreachable) or the embedded index's
    path is looked at."""
    env = make_env(QDRANT_URL=f"http://127.0.0.1:{free_port()}")
    result = ams_ops(env, "index", *command)
    assert result.exit_code == 2, result.output
    assert result.stderr == "ams-ops: QDRANT_URL is set: the Qdrant server keeps its own data; use its snapshot API\n"
    assert not Path(env["IMAGE_SEARCH_DB_PATH"]).exists()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory short enough for its engine's socket to lie in it (pytest's tmp_path is too long: the socket of
    an index there is put in the temp dir)."""
    path = Path(tempfile.mkdtemp(prefix="ams-ops-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", [["stats"], ["backup"], ["restore"], ["build"]])
def test_index_with_a_database_path_that_is_a_file_fails_with_one_line(make_env, short_tmp, command):
    path = short_tmp / "image_search.db"
    path.write_text("not a directory")
    env = make_env(IMAGE_SEARCH_DB_PATH=str(path))
    socket_path = EngineLayout.under(path, "images").socket_path
    assert socket_path.is_relative_to(path)
    result = ams_ops(env, "index", *command)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"ams-ops: cannot reach the image index: its engine's socket {socket_path} "
        f"(IMAGE_SEARCH_DB_PATH={path}): Not a directory\n"
    )


def test_index_with_an_engine_socket_it_may_not_open_fails_with_one_line(make_env, short_tmp):
    """The running server's engine socket is its user's alone (0600): an operator who is someone else is told which
    socket, and why, in one line. Run as root, the command runs without root's power to open any file."""
    path = short_tmp / "image_search.db"
    env = make_env(IMAGE_SEARCH_DB_PATH=str(path))
    socket_path = EngineLayout.under(path, "images").socket_path
    socket_path.parent.mkdir(parents=True)
    without_privileges: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("run as root without setpriv (util-linux) to drop root's capabilities")
        without_privileges = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    with socket.socket(socket.AF_UNIX) as engine:
        engine.bind(str(socket_path))
        engine.listen()
        socket_path.chmod(0)
        result = subprocess.run(
            [*without_privileges, sys.executable, "-m", "processor.ops", "index", "stats"],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"ams-ops: cannot reach the image index: its engine's socket {socket_path} "
        f"(IMAGE_SEARCH_DB_PATH={path}): Permission denied\n"
    )


def test_callbacks_send_without_a_url_or_a_secret_is_a_usage_or_configuration_error(make_env):
    secret = "whsec_" + base64.b64encode(bytes(32)).decode()
    env = make_env(CALLBACK_SECRET=secret, CALLBACK_HOSTS="hooks.example.com")
    nowhere = ams_ops(env, "callbacks", "send")
    assert nowhere.exit_code == 2, nowhere.output
    assert "Error: give a URL, a --job-id, or both" in nowhere.stderr

    unsigned = ams_ops({**env, "CALLBACK_SECRET": ""}, "callbacks", "send", "https://hooks.example.com/ams")
    assert unsigned.exit_code == 2, unsigned.output
    assert unsigned.stderr == "ams-ops: configuration error: CALLBACK_SECRET is not set: callbacks are signed with it\n"


def _many_letters(count: int) -> list[Letter]:
    return [
        Letter(f"many-{n:04d}", "image.index", "storage_unavailable", 5, MINUTE, {"key": f"images/incoming/{n}.png"})
        for n in range(count)
    ]


def test_dlq_list_into_a_reader_that_stops_early_ends_quietly(env):
    """`ams-ops dlq list | head -2`: the closed pipe ends the command without a word (it is no RabbitMQ failure), and
    every dead letter stays."""
    asyncio.run(reset_and_seed(env["AMQP_URL"], _many_letters(1000), dt.datetime.now(tz=dt.UTC)))
    process = subprocess.Popen(
        [sys.executable, "-m", "processor.ops", "dlq", "list"],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert len(process.stdout.read(100)) == 100  # far less than the listing (over 100 KiB), the rest never read
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert stderr == ""
    assert asyncio.run(depth(env["AMQP_URL"], "ams.dead")) == 1000


def test_events_watch_into_a_reader_that_stops_early_ends_quietly(make_env):
    """`ams-ops events watch --json | head -1`: the event that finds the pipe closed ends the watch without a word."""
    env = make_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "processor.ops", "events", "watch", "--json"],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        assert select.select([process.stderr], [], [], 30)[0], "the watch did not start"
        assert process.stderr.readline().decode().startswith("watching ams.events")
        process.stdout.close()  # the reader goes away before any event
        record = JobStore.new(str(uuid.uuid4()), "image.generate", {"prompt": "x"})
        record.status, record.finished_at, record.attempts = "succeeded", record.created_at, 1
        asyncio.run(_announce(env["AMQP_URL"], *job_finished(record)))
        assert process.wait(timeout=30) == 1
    finally:
        process.kill()
    assert process.stderr.read().decode() == ""


async def _announce(amqp_url: str, routing_key: str, event: JobFinishedV1) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        await exchange.publish(aio_pika.Message(msgspec.json.encode(event)), routing_key=routing_key)


def _read_terminal(controller: int, until: str | None, seconds: float) -> str:
    """What the command wrote to its terminal: until `until` appears, or all there is (`until` None), within
    `seconds`."""
    output, deadline = "", time.monotonic() + seconds
    while time.monotonic() < deadline and (until is None or until not in output):
        if not select.select([controller], [], [], 0.1)[0]:
            if until is None:
                break
            continue
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the command ended and its side of the terminal closed
            break
        if not chunk:
            break
        output += chunk.decode(errors="replace")
    return output


def _at_the_question(env: dict[str, str], *args: str, answer: bytes | None = None) -> tuple[int | None, str]:
    """The command run on a terminal, its question answered (`answer` typed, or Ctrl-C pressed when None): its status
    (None: still running 20 s later: what it guards against is waiting for Enter for good) and what it wrote."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "processor.ops", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, **env},
        cwd=ROOT,
        start_new_session=True,
    )
    os.close(terminal)
    try:
        output = _read_terminal(controller, "[y/N]", 30)
        assert "[y/N]" in output, output
        if answer is None:
            process.send_signal(signal.SIGINT)
        else:
            os.write(controller, answer)
        try:
            code: int | None = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = None
        return code, output + _read_terminal(controller, None, 1)
    finally:
        process.kill()
        process.wait()
        os.close(controller)


def test_ctrl_c_at_the_purge_question_ends_it_at_once_and_deletes_nothing(env, amqp_url):
    code, output = _at_the_question(env, "dlq", "purge", "--all")
    assert code == 1, output
    assert "Delete 5 dead letters? [y/N]" in output and "Aborted!" in output
    assert queued_ids(amqp_url, "ams.dead") == ALL_IDS


def test_the_purge_question_answered_on_a_terminal(env, amqp_url):
    code, output = _at_the_question(env, "dlq", "purge", "--type", "image.generate", answer=b"maybe\nn\n")
    assert code == 0, output
    assert "Error: invalid input" in output and output.rstrip().endswith("deleted 0, left 5 in ams.dead")
    code, output = _at_the_question(env, "dlq", "purge", "--type", "image.generate", answer=b"yes\n")
    assert code == 0, output
    assert output.rstrip().endswith("deleted 1, left 4 in ams.dead")
    assert "gen-1" not in queued_ids(amqp_url, "ams.dead")


@pytest.mark.parametrize("command", ["cancel", "delete-output"])
def test_ctrl_c_at_a_jobs_question_ends_it_at_once_and_changes_nothing(cancel_env, command):
    before = ams_ops(cancel_env, "jobs", "list", "--json").stdout
    code, output = _at_the_question(cancel_env, "jobs", command, "--all")
    assert code == 1, output
    assert "? [y/N]" in output and "Aborted!" in output
    assert ams_ops(cancel_env, "jobs", "list", "--json").stdout == before
