"""`ams-ops callbacks send`: POST a job's end to a callback URL now, signed and checked as a processor does it, to
try a receiver (a sample end of a made-up job) or to send a job's callback again by hand (its recorded end)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from contract.callbacks import JobCallbackV1
from contract.events import JobFinishedV1, has_ended, job_finished
from contract.jobs import now_iso
from contract.messages import IMAGE_GENERATE
from infra.settings import Settings, SettingsError
from processor.handlers.callback_client import open_client
from processor.handlers.job_callback import deliver
from processor.ops.errors import OperationFailedError
from processor.ops.jobs import get_job
from processor.outcomes import Succeeded

SAMPLE_PROMPT = "a sample end sent by ams-ops callbacks send"


@dataclass(frozen=True, slots=True)
class SendReport:
    url: str
    job_id: str
    event_id: str
    delivered: bool
    detail: str  # the answer's status code, or why it was not delivered

    def summary(self) -> dict[str, object]:
        return {
            "url": self.url,
            "job_id": self.job_id,
            "event_id": self.event_id,
            "delivered": self.delivered,
            "detail": self.detail,
        }


async def send_callback(settings: Settings, url: str | None, job_id: str | None) -> SendReport:
    """POST the end of job `job_id` (to `url`, or to the job's own callback URL), or a sample end to `url` (one of
    them is given). SettingsError when CALLBACK_SECRET is not set."""
    if not settings.callback_secrets:
        raise SettingsError("CALLBACK_SECRET is not set: callbacks are signed with it")
    if job_id is not None:
        event, recorded_url = await _recorded_end(settings, job_id)
        url = url or recorded_url
        if url is None:
            raise OperationFailedError(f"job {job_id} has no callback_url; give a URL to send its end to")
    elif url is None:
        raise ValueError("send_callback needs a URL, a job id, or both")
    else:
        event = _sample_end()
    async with open_client(settings) as client:
        outcome = await deliver(
            client,
            JobCallbackV1(url=url, event=event),
            hosts=settings.callback_hosts,
            secrets=settings.callback_secrets,
        )
    if isinstance(outcome, Succeeded):
        detail = f"answered {outcome.result['status_code']}"
        return SendReport(url, event.job_id, event.event_id, True, detail)
    return SendReport(url, event.job_id, event.event_id, False, f"{outcome.code}: {outcome.message}")


async def _recorded_end(settings: Settings, job_id: str) -> tuple[JobFinishedV1, str | None]:
    record = await get_job(settings, job_id)
    if not has_ended(record):
        raise OperationFailedError(f"job {job_id} has not ended ({record.status}); only an end is sent")
    return job_finished(record)[1], record.callback_url


def _sample_end() -> JobFinishedV1:
    """The end of a made-up generation, with a fresh event id (a receiver does not drop it as a repeat)."""
    stamp = now_iso()
    return JobFinishedV1(
        event_id=str(uuid.uuid4()),
        job_id=str(uuid.uuid4()),
        type=IMAGE_GENERATE,
        status="succeeded",
        created_at=stamp,
        started_at=stamp,
        finished_at=stamp,
        attempts=1,
        params={"prompt": SAMPLE_PROMPT},
    )
