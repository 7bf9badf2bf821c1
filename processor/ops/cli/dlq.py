"""`ams-ops dlq`: list, show, replay and purge the dead letters in ams.dead."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import click

from infra.broker import DEAD_QUEUE, JOBS_EXCHANGE
from processor.ops.cli.common import EXIT_CODES, When, ask, echo, progress, read_settings, run
from processor.ops.dlq import open_dead_letters
from processor.ops.errors import OperationFailedError
from processor.ops.filters import Selection
from processor.ops.render import letter_details, letters_json, letters_table


def _filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = (
        click.option("--id", "ids", multiple=True, metavar="ID", help="Message id (repeatable)."),
        click.option("--type", "types", multiple=True, metavar="TYPE", help="Job type, e.g. image.index (repeatable)."),
        click.option(
            "--reason",
            "reasons",
            multiple=True,
            metavar="CODE",
            help="Reason code, e.g. storage_unavailable (repeatable).",
        ),
        click.option(
            "--since",
            type=When(),
            help="Last failure at or after WHEN: ISO-8601 (2026-11-25T10:00Z; UTC if no zone) or an age (30m, 2h, 1d).",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _all_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--all", "everything", is_flag=True, help="Every dead letter (instead of filters).")(command)


def _selection(
    ids: tuple[str, ...],
    types: tuple[str, ...],
    reasons: tuple[str, ...],
    since: dt.datetime | None,
    everything: bool | None = None,
) -> Selection:
    """The filters; with `everything` given (replay, purge), exactly one of filters or --all is required."""
    selection = Selection(frozenset(ids), frozenset(types), frozenset(reasons), since)
    if everything is None:
        return selection
    if everything and not selection.is_empty:
        raise click.UsageError("--all selects every dead letter: give it without --id/--type/--reason/--since")
    if not everything and selection.is_empty:
        raise click.UsageError("say which dead letters: --id, --type, --reason, --since, or --all for every one")
    return selection


@click.group(epilog=EXIT_CODES)
def dlq() -> None:
    """Dead letters: the jobs in queue ams.dead that failed for good or could not be started.

    Every command takes all messages of ams.dead without acknowledging them, works on that snapshot and
    puts back, in their order, those it did not replay or delete.
    """


@dlq.command("list", epilog=EXIT_CODES)
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of the table.")
def list_letters(
    ids: tuple[str, ...], types: tuple[str, ...], reasons: tuple[str, ...], since: dt.datetime | None, as_json: bool
) -> None:
    """List dead letters (all, or those matching the filters); the queue is left unchanged."""
    selection = _selection(ids, types, reasons, since)
    settings = read_settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if as_json:
                echo(letters_json(matching))
            elif not queue.letters:
                echo(f"{DEAD_QUEUE} is empty")
            elif not matching:
                echo(f"no dead letters match ({len(queue.letters)} in {DEAD_QUEUE})")
            else:
                echo(letters_table(matching))
                echo(f"\n{len(matching)} of {len(queue.letters)} dead letters in {DEAD_QUEUE}")

    run(work())


@dlq.command(epilog=EXIT_CODES)
@click.argument("message_id", metavar="ID")
def show(message_id: str) -> None:
    """Show one dead letter: failure, AMQP properties, headers and body.

    A JSON body is pretty-printed; a msgpack body is decoded and shown as JSON, binary fields as "<N bytes>";
    any other body as its size and a text or hex preview. Long strings are shortened.
    """
    settings = read_settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            found = queue.with_id(message_id)
            if not found:
                raise OperationFailedError(
                    f"no dead letter with message id {message_id!r} ({len(queue.letters)} in {DEAD_QUEUE})"
                )
            echo("\n\n".join(letter_details(letter) for letter in found))

    run(work())


@dlq.command(epilog=EXIT_CODES)
@_filter_options
@_all_option
@click.option("--dry-run", is_flag=True, help="Print what would be replayed and change nothing.")
def replay(
    ids: tuple[str, ...],
    types: tuple[str, ...],
    reasons: tuple[str, ...],
    since: dt.datetime | None,
    everything: bool,
    dry_run: bool,
) -> None:
    """Publish matching dead letters to ams.jobs again, with their full number of attempts.

    The copy keeps message id, type, content type, priority, body and headers, goes to the job's original
    routing key (and so to its capability's queue), and drops x-ams-attempts, ams-retry-delay (x-ams-retry-delay
    in letters of earlier versions), reply_to and correlation_id; it gets x-ams-replayed-at. A dead letter is
    removed only after RabbitMQ confirmed its copy. A letter whose routing key no queue takes lands in ams.unrouted,
    and a processor dead-letters it again.
    """
    selection = _selection(ids, types, reasons, since, everything)
    settings = read_settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if dry_run:
                if matching:
                    echo(letters_table(matching))
                echo(f"would replay {len(matching)}, leave {queue.remaining - len(matching)} in {DEAD_QUEUE}")
                return
            replayed = 0
            try:
                with progress(len(matching), f"replaying to {JOBS_EXCHANGE}", visible=True) as advance:
                    for letter in matching:
                        await queue.replay(letter)
                        replayed += 1
                        advance(1)
            except OperationFailedError as exc:
                raise OperationFailedError(f"{exc} (replayed {replayed} of {len(matching)} before that)") from None
            echo(f"replayed {replayed}, left {queue.remaining} in {DEAD_QUEUE}")

    run(work())


@dlq.command(epilog=EXIT_CODES)
@_filter_options
@_all_option
@click.option("--dry-run", is_flag=True, help="Print what would be deleted and change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(
    ids: tuple[str, ...],
    types: tuple[str, ...],
    reasons: tuple[str, ...],
    since: dt.datetime | None,
    everything: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete matching dead letters for good (asks first unless --yes)."""
    selection = _selection(ids, types, reasons, since, everything)
    settings = read_settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if dry_run:
                if matching:
                    echo(letters_table(matching))
                echo(f"would delete {len(matching)}, leave {queue.remaining - len(matching)} in {DEAD_QUEUE}")
                return
            if matching and not yes and not await ask(f"Delete {len(matching)} dead letters?"):
                echo(f"deleted 0, left {queue.remaining} in {DEAD_QUEUE}")
                return
            with progress(len(matching), f"deleting from {DEAD_QUEUE}", visible=True) as advance:
                for letter in matching:
                    await queue.delete(letter)
                    advance(1)
            echo(f"deleted {len(matching)}, left {queue.remaining} in {DEAD_QUEUE}")

    run(work())
