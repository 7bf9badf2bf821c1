"""The withdrawals an API process owes for records the object store did not answer about (api/withdrawals.py), on
a real (embedded) store; the hung S3 server end to end is in tests/test_outages.py."""

from __future__ import annotations

import asyncio

import pytest

from api.withdrawals import Withdrawals
from contract.jobs import JobStore, is_withdrawn
from infra.storage import StorageError, StorageUnavailableError
from infra.storage.local import LocalStore
from tests.support.amqp import wait_until

ROUND_SECONDS = 0.05


@pytest.fixture
def jobs(tmp_path, monkeypatch) -> JobStore:
    monkeypatch.setattr("api.withdrawals.ROUND_SECONDS", ROUND_SECONDS)
    return JobStore(LocalStore(tmp_path / "store"), 7)


def _queued(job_id: str):
    return JobStore.new(job_id, "image.generate", {"prompt": "p"})


async def test_a_record_whose_message_may_have_left_is_marked_withdrawn(jobs):
    record = _queued("maybe-sent")
    await jobs.create(record)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(record, "RabbitMQ did not confirm it", remove=False)
    try:

        async def marked() -> bool:
            stored = await jobs.get(record.job_id)
            return stored is not None and is_withdrawn(stored)

        await wait_until(marked, timeout=5)
        assert "RabbitMQ did not confirm it" in (await jobs.get(record.job_id)).error.message
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
    finally:
        await withdrawals.close()


async def test_a_record_written_after_it_was_owed_is_removed(jobs):
    """The store took the write without answering and makes it later: the record, absent at first, goes once it
    is there."""
    record = _queued("late")
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(record, "no answer", remove=True)
    try:
        await asyncio.sleep(5 * ROUND_SECONDS)
        assert withdrawals.owed == 1  # absent: looked for again, for as long as the store may still write it
        await jobs.create(record)
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
        assert await jobs.get(record.job_id) is None
    finally:
        await withdrawals.close()


async def test_a_record_changed_meanwhile_is_left_as_it_is(jobs):
    """A processor took the job after all (its running mark), or a retry with its Idempotency-Key wrote its own."""
    taken, retried = _queued("taken"), _queued("retried")
    for record in (taken, retried):
        await jobs.create(record)
    stored, version = await jobs.load(taken.job_id)
    stored.status, stored.marks = "running", ["a-mark"]
    await jobs.update(stored, version)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(taken, "no answer", remove=True)
    withdrawals.owe(_queued("retried"), "no answer", remove=True)  # another request's record of the same job id
    try:
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
        assert (await jobs.get(taken.job_id)).status == "running"
        assert (await jobs.get(retried.job_id)) == retried
    finally:
        await withdrawals.close()


async def test_nothing_is_looked_for_once_the_store_has_answered_long_enough_without_it(jobs, monkeypatch):
    monkeypatch.setattr("api.withdrawals.ABSENT_FOR_SECONDS", 0.2)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(_queued("never-written"), "no answer", remove=True)
    try:
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
    finally:
        await withdrawals.close()


async def test_a_record_with_an_idempotency_key_is_left_to_its_retries(jobs):
    """The retry the 503 asked for finds it and sends its message (api/resend.py): a withdrawal racing it would take
    back a job that retry answered 202 for."""
    record = JobStore.new("keyed", "image.generate", {"prompt": "p"}, idempotency_key="k")
    await jobs.create(record)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(record, "no answer", remove=True)
    try:
        assert withdrawals.owed == 0
        await asyncio.sleep(5 * ROUND_SECONDS)
        assert await jobs.get(record.job_id) == record
    finally:
        await withdrawals.close()


async def test_a_store_refusing_for_good_gives_each_withdrawal_up_once_and_the_others_go_on(jobs, monkeypatch):
    first, second = _queued("refused"), _queued("second")
    for record in (first, second):
        await jobs.create(record)
    load = jobs.load

    async def refusing(job_id: str):
        if job_id == first.job_id:
            raise StorageError("access denied")
        return await load(job_id)

    monkeypatch.setattr(jobs, "load", refusing)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(first, "no answer", remove=True)
    withdrawals.owe(second, "no answer", remove=True)
    try:
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
        assert await jobs.get(second.job_id) is None
        assert (await load(first.job_id))[0] == first
    finally:
        await withdrawals.close()


async def test_an_outage_between_looks_makes_the_store_answer_without_the_record_anew(jobs, monkeypatch):
    """Absent, then the store down a while: the record may be written when it answers again, so it is looked for
    until the store has answered ABSENT_FOR_SECONDS on end without it."""
    monkeypatch.setattr("api.withdrawals.ABSENT_FOR_SECONDS", 0.5)
    record = _queued("across-an-outage")
    load, down = jobs.load, asyncio.Event()

    async def flaky(job_id: str):
        if down.is_set():
            raise StorageUnavailableError("no answer")
        return await load(job_id)

    monkeypatch.setattr(jobs, "load", flaky)
    withdrawals = Withdrawals(jobs)
    withdrawals.owe(record, "no answer", remove=True)
    try:
        await asyncio.sleep(0.3)  # looked for, absent
        down.set()
        await asyncio.sleep(0.5)  # past ABSENT_FOR_SECONDS since it was first found absent
        down.clear()
        await asyncio.sleep(3 * ROUND_SECONDS)  # answering again, still without it
        await jobs.create(record)  # written late
        await wait_until(lambda: withdrawals.owed == 0, timeout=5)
        assert await load(record.job_id) is None
    finally:
        await withdrawals.close()
