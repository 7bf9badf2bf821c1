"""`ams-ops callbacks send`: POST a job's end to a callback URL by hand."""

from __future__ import annotations

import json
import sys

import click

from processor.ops.callbacks import SendReport, send_callback
from processor.ops.cli.common import EXIT_CODES, echo, read_settings, run


@click.group(epilog=EXIT_CODES)
def callbacks() -> None:
    """HTTP callbacks: a job's end POSTed to its callback_url (CALLBACK_HOSTS, CALLBACK_SECRET)."""


@callbacks.command("send", epilog=EXIT_CODES)
@click.argument("url", required=False)
@click.option("--job-id", help="Send this finished job's end (to URL, or to the job's own callback_url).")
@click.option("--json", "as_json", is_flag=True, help="A JSON object instead of the text.")
def send(url: str | None, job_id: str | None, as_json: bool) -> None:
    """POST a job's end now, signed and checked as a processor does it: a sample end of a made-up job to URL (to
    try a receiver), or the recorded end of --job-id (to send its callback again by hand). Exit 1 when it is not
    delivered (the answer, or the reason, is printed)."""
    if url is None and job_id is None:
        raise click.UsageError("give a URL, a --job-id, or both")
    settings = read_settings()
    report: SendReport = run(send_callback(settings, url, job_id))
    if as_json:
        echo(json.dumps(report.summary()))
    else:
        outcome = "delivered" if report.delivered else "not delivered"
        echo(f"{outcome}: {report.url} {report.detail} (job {report.job_id}, event {report.event_id})")
    if not report.delivered:
        sys.exit(1)
