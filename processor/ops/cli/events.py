"""`ams-ops events watch`: job ends as they are announced on ams.events."""

from __future__ import annotations

import contextlib

import click
import msgspec

from contract.callbacks import JOB_CALLBACK
from contract.events import JobFinishedV1
from contract.messages import JOB_TYPES
from infra.broker import EVENTS_EXCHANGE
from processor.ops.cli.common import EXIT_CODES, echo, read_settings, run
from processor.ops.events import STATUSES, binding_keys, event_line, watch_events


@click.group(epilog=EXIT_CODES)
def events() -> None:
    """Job events: the end of every job with a record, as announced on the ams.events exchange."""


@events.command("watch", epilog=EXIT_CODES)
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(sorted(set(JOB_TYPES) - {JOB_CALLBACK})),  # a callback is not a job with an end of its own
    help="Only jobs of this type (repeatable).",
)
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Only this outcome (repeatable)."
)
@click.option("--json", "as_json", is_flag=True, help="Each event's JSON body on a line of its own.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
def watch(
    types: tuple[str, ...], statuses: tuple[str, ...], as_json: bool, count: int | None, seconds: float | None
) -> None:
    """Print job ends as they are announced, one line each (when it finished, job id, type, status, error code),
    until Ctrl-C, --count or --seconds. Only events announced while it watches are seen."""
    settings = read_settings()
    keys = binding_keys(types, statuses)

    def show(event: JobFinishedV1) -> None:
        echo(msgspec.json.encode(event).decode() if as_json else event_line(event))

    def ready() -> None:
        click.echo(f"watching {EVENTS_EXCHANGE} ({', '.join(keys)}); Ctrl-C stops", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        run(watch_events(settings, keys, show, count=count, seconds=seconds, ready=ready))
