"""ams-ops: the operator's command line.

    ams-ops dlq list [FILTERS] [--json]          the dead letters in ams.dead (the queue is left as it was)
    ams-ops dlq show ID                          one dead letter: properties, headers, body decoded
    ams-ops dlq replay (FILTERS | --all) [--dry-run]          publish matching dead letters to ams.jobs again
    ams-ops dlq purge (FILTERS | --all) [--dry-run] [--yes]   delete matching dead letters
    ams-ops jobs list [--status S] [--type T] [--code C] [--updated-before WHEN] [--json]   job records, oldest first
    ams-ops jobs show ID                         one job record, as JSON
    ams-ops jobs cancel (ID... | --type T | --updated-before WHEN | --all) [--dry-run] [--yes]   cancel queued jobs
    ams-ops events watch [--type T] [--status S] [--json] [--count N] [--seconds S]   job ends as they happen
    ams-ops backfill --prefix P [--dry-run] [--api-url URL] [--json]   index images already in the bucket
    ams-ops backfill --thumbnails [--api-url URL] [--json]             make the missing thumbnails of indexed images
    ams-ops index stats [--json]                 the image index: points, graph, disk, backups
    ams-ops index backup                         back the embedded index up to the object store now
    ams-ops index restore [--key KEY] [--force]  restore the newest (or a given) backup; the server stopped
    ams-ops index build [--wait]                 build the search graph of the points not yet in it

FILTERS: --id ID, --type TYPE, --reason CODE (each repeatable) and --since WHEN (ISO-8601 or 30m, 2h, 1d),
compared with the last failure. Settings come from the server's environment (AMQP_URL, R2_*, ...).

Exit codes:
    0  success, also when nothing matched
    1  an operation failed: RabbitMQ, storage or the API unreachable, no dead letter or job record with that id
    2  usage or configuration error: bad option, replay/purge without a filter, a bad environment variable
Errors are one line on stderr, starting with "ams-ops:".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import click
import msgspec

from contract.callbacks import JOB_CALLBACK
from contract.events import JobFinishedV1
from contract.jobs import JobRecord
from contract.messages import JOB_TYPES
from infra.broker import DEAD_QUEUE, EVENTS_EXCHANGE, JOBS_EXCHANGE
from infra.logging import configure_logging
from infra.settings import Settings, SettingsError
from infra.storage.base import InvalidKeyError
from infra.storage.keys import validate_prefix
from infra.vectors import SnapshotsUnsupportedError
from processor.ops.backfill import plan_backfill, run_backfill
from processor.ops.callbacks import SendReport, send_callback
from processor.ops.dlq import open_dead_letters
from processor.ops.errors import OperationFailedError
from processor.ops.events import STATUSES, binding_keys, event_line, watch_events
from processor.ops.filters import Selection, parse_when
from processor.ops.index import backup_now, build_graph, index_report, restore_backup
from processor.ops.jobs import (
    CancelReport,
    JobSelection,
    OutputReport,
    cancel_jobs,
    delete_outputs,
    get_job,
    has_output,
    job_json,
    jobs_json,
    jobs_table,
    list_jobs,
)
from processor.ops.render import letter_details, letters_json, letters_table
from processor.ops.thumbnails import ThumbnailReport, run_thumbnail_backfill

T = TypeVar("T")

EXIT_CODES = """\b
Exit codes:
  0  success, also when nothing matched
  1  an operation failed: RabbitMQ, storage or the API unreachable,
     no dead letter or job record with that id
  2  usage or configuration error: bad option, replay/purge without a
     filter, a bad environment variable
"""


class CommandFailed(click.ClickException):
    """Exit 1 with one line on stderr."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ams-ops: {self.message}", err=True)


class BadConfiguration(CommandFailed):
    """Exit 2: the environment holds a value the server could not start with either."""

    exit_code = 2


class OutputClosed(Exception):
    """Whoever read the standard output stopped reading (`ams-ops dlq list | head -2`). No OSError, so the handlers
    of RabbitMQ's, the store's or the index's failures let it through, to `main`."""


def _echo(message: str) -> None:
    """`click.echo` to the standard output; a closed pipe there is OutputClosed."""
    try:
        click.echo(message)
    except BrokenPipeError:
        raise OutputClosed from None


class When(click.ParamType):
    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        try:
            return parse_when(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise BadConfiguration(f"configuration error: {exc}") from None


def _run(work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except OperationFailedError as exc:
        raise CommandFailed(str(exc)) from None
    except SnapshotsUnsupportedError as exc:
        raise BadConfiguration(str(exc)) from None
    except SettingsError as exc:  # a setting only this command needs
        raise BadConfiguration(f"configuration error: {exc}") from None


@contextlib.contextmanager
def _progress(length: int, label: str, visible: bool) -> Iterator[Callable[[int], object]]:
    """A progress bar on stderr when that is a terminal (not in logs or pipes); `advance(n)` moves it."""
    if not visible or length == 0 or not sys.stderr.isatty():
        yield lambda _steps: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update


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


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Operate an AI model server deployment: inspect, replay and purge dead letters; list job records;
    backfill, back up and restore the image index.

    Settings come from the same environment as the server (AMQP_URL, AMQP_CONNECT_TIMEOUT_SECONDS,
    R2_*, LOCAL_STORAGE_DIR, ...).
    """


@cli.group(epilog=EXIT_CODES)
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
    settings = _settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if as_json:
                _echo(letters_json(matching))
            elif not queue.letters:
                _echo(f"{DEAD_QUEUE} is empty")
            elif not matching:
                _echo(f"no dead letters match ({len(queue.letters)} in {DEAD_QUEUE})")
            else:
                _echo(letters_table(matching))
                _echo(f"\n{len(matching)} of {len(queue.letters)} dead letters in {DEAD_QUEUE}")

    _run(work())


@dlq.command(epilog=EXIT_CODES)
@click.argument("message_id", metavar="ID")
def show(message_id: str) -> None:
    """Show one dead letter: failure, AMQP properties, headers and body.

    A JSON body is pretty-printed; a msgpack body is decoded and shown as JSON, binary fields as "<N bytes>";
    any other body as its size and a text or hex preview. Long strings are shortened.
    """
    settings = _settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            found = queue.with_id(message_id)
            if not found:
                raise OperationFailedError(
                    f"no dead letter with message id {message_id!r} ({len(queue.letters)} in {DEAD_QUEUE})"
                )
            _echo("\n\n".join(letter_details(letter) for letter in found))

    _run(work())


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
    settings = _settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if dry_run:
                if matching:
                    _echo(letters_table(matching))
                _echo(f"would replay {len(matching)}, leave {queue.remaining - len(matching)} in {DEAD_QUEUE}")
                return
            replayed = 0
            try:
                with _progress(len(matching), f"replaying to {JOBS_EXCHANGE}", visible=True) as advance:
                    for letter in matching:
                        await queue.replay(letter)
                        replayed += 1
                        advance(1)
            except OperationFailedError as exc:
                raise OperationFailedError(f"{exc} (replayed {replayed} of {len(matching)} before that)") from None
            _echo(f"replayed {replayed}, left {queue.remaining} in {DEAD_QUEUE}")

    _run(work())


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
    settings = _settings()

    async def work() -> None:
        async with open_dead_letters(settings.amqp_url, settings.amqp_connect_timeout_seconds) as queue:
            matching = selection.apply(queue.letters)
            if dry_run:
                if matching:
                    _echo(letters_table(matching))
                _echo(f"would delete {len(matching)}, leave {queue.remaining - len(matching)} in {DEAD_QUEUE}")
                return
            if matching and not yes and not await _ask(f"Delete {len(matching)} dead letters?"):
                _echo(f"deleted 0, left {queue.remaining} in {DEAD_QUEUE}")
                return
            with _progress(len(matching), f"deleting from {DEAD_QUEUE}", visible=True) as advance:
                for letter in matching:
                    await queue.delete(letter)
                    advance(1)
            _echo(f"deleted {len(matching)}, left {queue.remaining} in {DEAD_QUEUE}")

    _run(work())


@cli.group(epilog=EXIT_CODES)
def jobs() -> None:
    """Job records: what became of each job the server was asked for (read from the object store).

    Records of finished jobs are kept JOB_RECORD_TTL_DAYS; those of unfinished jobs until they finish. A job
    `queued` long after it was asked for, never attempted, may be one whose API process stopped before publishing
    it (see the README: a job whose message never left).
    """


@jobs.command("list", epilog=EXIT_CODES)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["queued", "running", "succeeded", "failed"]),
    help="Job status (repeatable).",
)
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Job type, e.g. image.generate (repeatable).")
@click.option(
    "--code",
    "codes",
    multiple=True,
    metavar="CODE",
    help="Error code of a failed job (e.g. withdrawn), or the last error's of one waiting for a retry (repeatable).",
)
@click.option(
    "--updated-before",
    type=When(),
    help="Last changed before WHEN: ISO-8601 (UTC if no zone) or an age (30m, 2h, 1d): jobs stuck that long.",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the records instead of the table.")
def list_jobs_command(
    statuses: tuple[str, ...],
    types: tuple[str, ...],
    codes: tuple[str, ...],
    updated_before: dt.datetime | None,
    as_json: bool,
) -> None:
    """List job records (all, or those matching the filters), oldest first."""
    selection = JobSelection(frozenset(statuses), frozenset(types), frozenset(codes), updated_before)
    matching, total = _run(list_jobs(_settings(), selection))
    if as_json:
        _echo(jobs_json(matching))
    elif not total:
        _echo("no job records")
    elif not matching:
        _echo(f"no job records match ({total} in all)")
    else:
        _echo(jobs_table(matching))
        _echo(f"\n{len(matching)} of {total} job records")


@jobs.command("show", epilog=EXIT_CODES)
@click.argument("job_id", metavar="ID")
def show_job(job_id: str) -> None:
    """One job record, whole, as JSON."""
    _echo(job_json(_run(get_job(_settings(), job_id))))


def _chosen_jobs(what: str, done: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The arguments of a command that acts on jobs given by id or chosen by filters (`_Choice`): `what` names the
    jobs the filters choose among, `done` what befalls them."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        options = (
            click.argument("job_ids", metavar="[ID]...", nargs=-1),
            click.option(
                "--type", "types", multiple=True, metavar="TYPE", help=f"Every {what} of this type (repeatable)."
            ),
            click.option(
                "--updated-before",
                type=When(),
                help=f"Every {what} last changed before WHEN: ISO-8601 (UTC if no zone) or an age (30m, 2h, 1d).",
            ),
            click.option("--all", "everything", is_flag=True, help=f"Every {what}."),
            click.option("--dry-run", is_flag=True, help=f"Print the {what}s that would be {done} and change nothing."),
            click.option(
                "--yes", "-y", is_flag=True, help="Do not ask for confirmation (asked when filters chose the jobs)."
            ),
        )
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@dataclass(frozen=True, slots=True)
class _Wording:
    """What a job command says when filters chose the jobs ({n}: how many): a dry run's summary, the question
    asked, and the summary when the answer is no."""

    would: str
    ask: str
    declined: str


@dataclass(frozen=True, slots=True)
class _Choice:
    """The jobs a command acts on: the ids given, or the records of one status the filters (or --all) choose."""

    job_ids: tuple[str, ...]
    types: tuple[str, ...]
    updated_before: dt.datetime | None
    everything: bool

    def check(self, what: str) -> None:
        filtered = bool(self.types or self.updated_before)
        if self.job_ids and (filtered or self.everything):
            raise click.UsageError("give job ids, or filters (--type, --updated-before, --all), not both")
        if self.everything and filtered:
            raise click.UsageError(f"--all means every {what}: give it without --type/--updated-before")
        if not (self.job_ids or filtered or self.everything):
            raise click.UsageError(f"say which jobs: their ids, --type, --updated-before, or --all for every {what}")

    async def ids(
        self,
        settings: Settings,
        status: str,
        keep: Callable[[JobRecord], bool],
        wording: _Wording,
        *,
        dry_run: bool,
        yes: bool,
    ) -> list[str] | None:
        """The ids to act on: those given, or those of the records the filters choose that `keep` keeps (asked
        first unless `yes`); None when the run ends here (a dry run, which lists them, or the answer no)."""
        if self.job_ids and not dry_run:
            return list(self.job_ids)
        if self.job_ids:
            records = [await get_job(settings, job_id) for job_id in self.job_ids]
        else:
            selection = JobSelection(frozenset({status}), frozenset(self.types), frozenset(), self.updated_before)
            records, _ = await list_jobs(settings, selection)
        matching = [record for record in records if keep(record)]
        if dry_run:
            if matching:
                _echo(jobs_table(matching))
            _echo(wording.would.format(n=len(matching)))
            return None
        if matching and not yes and not await _ask(wording.ask.format(n=len(matching))):
            _echo(wording.declined)
            return None
        return [record.job_id for record in matching]


@jobs.command("cancel", epilog=EXIT_CODES)
@_chosen_jobs("queued job", "cancelled")
def cancel_jobs_command(
    job_ids: tuple[str, ...],
    types: tuple[str, ...],
    updated_before: dt.datetime | None,
    everything: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Cancel queued jobs, given by id or chosen by filters (or --all), as POST /v1/jobs/{id}/cancel does.

    Each record says `failed`, code `cancelled`; a processor that takes a cancelled job's message acknowledges it
    and makes nothing, answering a requester that still waits for it. A job that is running or finished (or
    starts meanwhile) is not cancelled: it is named with why, and the rest go on.
    """
    choice = _Choice(job_ids, types, updated_before, everything)
    choice.check("queued job")
    settings = _settings()
    wording = _Wording("would cancel {n} queued jobs", "Cancel {n} queued jobs?", "cancelled 0")

    async def work() -> None:
        chosen = await choice.ids(settings, "queued", _is_queued, wording, dry_run=dry_run, yes=yes)
        if chosen is not None:
            _echo(_cancel_summary(await cancel_jobs(settings, chosen)))

    _run(work())


@jobs.command("delete-output", epilog=EXIT_CODES)
@_chosen_jobs("generation output", "deleted")
def delete_outputs_command(
    job_ids: tuple[str, ...],
    types: tuple[str, ...],
    updated_before: dt.datetime | None,
    everything: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete the generated images and voices of finished jobs now, given by id or chosen by filters (or --all), as
    DELETE /v1/jobs/{id}/output does.

    Each record keeps its job, saying `output_deleted` (reason `deleted`); the job's Idempotency-Key then answers
    410 and its message makes nothing again. A job without an output (not finished, failed, an upload's) is named
    with why, and the rest go on.
    """
    choice = _Choice(job_ids, types, updated_before, everything)
    choice.check("generation output")
    settings = _settings()
    wording = _Wording("would delete {n} outputs", "Delete the outputs of {n} jobs?", "deleted 0")

    async def work() -> None:
        chosen = await choice.ids(settings, "succeeded", has_output, wording, dry_run=dry_run, yes=yes)
        if chosen is not None:
            _echo(_output_summary(await delete_outputs(settings, chosen)))

    _run(work())


def _is_queued(record: JobRecord) -> bool:
    return record.status == "queued"


def _output_summary(report: OutputReport) -> str:
    lines = [*report.refused, f"deleted {len(report.deleted)}"]
    if report.already:
        lines[-1] += f", {len(report.already)} deleted already"
    if report.refused:
        lines[-1] += f", {len(report.refused)} without an output"
    return "\n".join(lines)


def _cancel_summary(report: CancelReport) -> str:
    lines = [*report.refused, f"cancelled {len(report.cancelled)}"]
    if report.already:
        lines[-1] += f", {len(report.already)} cancelled already"
    if report.refused:
        lines[-1] += f", {len(report.refused)} not cancellable"
    if report.owed:
        lines[-1] += f" ({report.owed} job events owed: RabbitMQ unreachable; a processor publishes them)"
    return "\n".join(lines)


async def _ask(question: str) -> bool:
    """The operator's yes or no, asked off the event loop, so a connection keeps its heartbeats while they think.

    Asked in a daemon thread of its own, not asyncio's executor: Ctrl-C cancels the command at once (nothing done,
    click's "Aborted!"), where asyncio.run would first wait for an executor thread blocked in input() until Enter.
    """
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bool] = loop.create_future()

    def settle(value: bool) -> None:
        if not answer.done():  # not when the command was cancelled meanwhile
            answer.set_result(value)

    def confirm() -> None:
        value = _confirm(question)
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the command ended meanwhile
            loop.call_soon_threadsafe(settle, value)

    threading.Thread(target=confirm, name="ams-ops-question", daemon=True).start()
    return await answer


def _confirm(question: str) -> bool:
    """click.confirm's question and answers on stderr (default no; the end of the input: no), the answer read
    straight from the standard input's file descriptor: not through sys.stdin, whose lock the thread blocked in it
    would hold while the interpreter ends after a Ctrl-C (a fatal error)."""
    while True:
        click.echo(f"{question} [y/N]: ", nl=False, err=True)
        line = _answer()
        if line is None:
            return False
        value = line.strip().lower()
        if value in ("y", "yes"):
            return True
        if value in ("n", "no", ""):
            return False
        click.echo("Error: invalid input", err=True)


def _answer() -> str | None:
    """One line of the standard input; None at its end."""
    if sys.stdin is None:  # closed when the command was started
        return None
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError):  # no file behind it (click's test runner)
        return sys.stdin.readline() or None
    line = bytearray()
    try:
        while not line.endswith(b"\n") and (byte := os.read(fd, 1)):
            line += byte
    except OSError:  # the terminal went away: no answer, as at the end of the input
        return None
    return line.decode(errors="replace") if line else None


def _prefix(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_prefix(value)
    except InvalidKeyError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(epilog=EXIT_CODES)
@click.option("--prefix", metavar="PREFIX", callback=_prefix, help="Key prefix to index, e.g. images/incoming/.")
@click.option(
    "--thumbnails",
    is_flag=True,
    help="Instead of --prefix: make the missing thumbnails of the images already in the index, through the API.",
)
@click.option("--dry-run", is_flag=True, help="With --prefix: count what would be published and publish nothing.")
@click.option(
    "--api-url",
    metavar="URL",
    envvar="AMS_API_URL",
    default="http://localhost:8000",
    show_default=True,
    help="The running API: asked which images are already indexed, or for their thumbnails [env AMS_API_URL].",
)
@click.option(
    "--api-key",
    metavar="KEY",
    envvar="AMS_API_KEY",
    default="",
    help="A read key, when the API requires keys (API_KEYS) [env AMS_API_KEY].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    metavar="N",
    help="Parallel requests to the API.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as a JSON object.")
def backfill(
    prefix: str | None, thumbnails: bool, dry_run: bool, api_url: str, api_key: str, concurrency: int, as_json: bool
) -> None:
    """Index the images already in the bucket under PREFIX, or (--thumbnails) make the missing thumbnails of
    the images already in the index.

    With --prefix: publishes one image.index job (message id = the image id derived from bucket and key) for
    each key with an image extension (.jpg .jpeg .png .webp .gif .bmp .tif .tiff) that the API does not know
    yet, so it can be re-run after an interruption. The server's own objects (images/originals/,
    images/thumbs/) are left out.

    With --thumbnails: walks the API's listing and asks for each image's thumbnail, which the API makes from
    the original when it is missing (images indexed before thumbnails existed). Images whose original is gone
    or unreadable are counted as skipped, with the API's error code.
    """
    if thumbnails:
        if prefix is not None or dry_run:
            raise click.UsageError("--thumbnails works on the whole index: give it without --prefix and --dry-run")
        _backfill_thumbnails(api_url, api_key, concurrency, as_json)
        return
    if prefix is None:
        raise click.UsageError("say what to backfill: --prefix PREFIX (index the images under it) or --thumbnails")
    settings = _settings()

    async def work() -> None:
        plan = await plan_backfill(settings, prefix)
        with _progress(len(plan.images), "indexing", visible=not (dry_run or as_json)) as advance:
            report = await run_backfill(
                plan,
                settings=settings,
                api_url=api_url,
                api_key=api_key,
                dry_run=dry_run,
                concurrency=concurrency,
                advance=advance,
            )
        if as_json:
            _echo(json.dumps(report.summary()))
            return
        verb = "would publish" if dry_run else "published"
        own = f", skipped (this server's own) {report.skipped_own}" if report.skipped_own else ""
        refused = report.skipped_not_indexable
        unindexable = f", skipped (a key not indexed or over IMAGE_SEARCH_MAX_BYTES) {refused}" if refused else ""
        _echo(
            f"{verb} {report.published}, already indexed {report.already_indexed}, "
            f"skipped (not images) {report.skipped_not_image}{own}{unindexable}"
        )

    _run(work())


def _backfill_thumbnails(api_url: str, api_key: str, concurrency: int, as_json: bool) -> None:
    report: ThumbnailReport = _run(run_thumbnail_backfill(api_url=api_url, api_key=api_key, concurrency=concurrency))
    if as_json:
        _echo(json.dumps(report.summary()))
        return
    reasons = ", ".join(f"{code} {count}" for code, count in sorted(report.skipped.items()))
    _echo(
        f"made {report.made}, already there {report.already_there}, skipped {report.skipped.total()}"
        + (f" ({reasons})" if reasons else "")
    )


@cli.group(epilog=EXIT_CODES)
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
    settings = _settings()
    keys = binding_keys(types, statuses)

    def show(event: JobFinishedV1) -> None:
        _echo(msgspec.json.encode(event).decode() if as_json else event_line(event))

    def ready() -> None:
        click.echo(f"watching {EVENTS_EXCHANGE} ({', '.join(keys)}); Ctrl-C stops", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        _run(watch_events(settings, keys, show, count=count, seconds=seconds, ready=ready))


@cli.group(epilog=EXIT_CODES)
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
    settings = _settings()
    report: SendReport = _run(send_callback(settings, url, job_id))
    if as_json:
        _echo(json.dumps(report.summary()))
    else:
        outcome = "delivered" if report.delivered else "not delivered"
        _echo(f"{outcome}: {report.url} {report.detail} (job {report.job_id}, event {report.event_id})")
    if not report.delivered:
        sys.exit(1)


@cli.group(epilog=EXIT_CODES)
def index() -> None:
    """The image index: what it holds, backups to the object store, restores, graph builds.

    With QDRANT_URL unset, these reach the embedded index of the running server (or, when none runs, open it
    for the duration of the command). Backups go to the configured object store under IMAGE_SEARCH_DB_R2_KEY.
    """


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@index.command(epilog=EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="A JSON object instead of the text.")
def stats(as_json: bool) -> None:
    """What the index holds: points, how many are in the search graph, disk use, last build, and backups."""
    settings = _settings()
    report = _run(index_report(settings))
    figures = report.stats
    if as_json:
        _echo(
            json.dumps(
                {
                    "index": msgspec.to_builtins(figures),
                    "served_by_running_server": report.served_by_running_server,
                    "backups": None
                    if report.backups is None
                    else [{"key": b.key, "size": b.size, "taken_at": b.taken_at} for b in report.backups],
                    "backups_error": report.backups_error,
                }
            )
        )
        return
    served = "the running server's" if report.served_by_running_server else "opened by this command"
    lines = [
        f"engine           {figures.engine} ({served})",
        f"location         {figures.location}",
        f"model            {figures.model_id or '-'} ({figures.dim or '-'} dimensions)",
        f"points           {figures.points}",
        f"in search graph  {figures.indexed_points} ({figures.points - figures.indexed_points} searched exactly)",
        f"segments         {figures.segments}",
        f"disk             {_size(figures.disk_bytes)}",
        f"graph build      {'running' if figures.building else 'idle'}",
    ]
    if figures.last_build:
        lines.append(f"last build       {json.dumps(figures.last_build)}")
    if report.backups_error:
        lines.append(f"backups          unavailable: {report.backups_error}")
    elif report.backups is not None:
        lines.append(f"backups          {len(report.backups)} under {settings.image_search_db_r2_key}")
        lines += [f"  {b.key}  {_size(b.size)}  {b.taken_at or 'old format'}" for b in report.backups]
    _echo("\n".join(lines))


@index.command(epilog=EXIT_CODES)
def backup() -> None:
    """Back the embedded index up to the object store now (also while the server runs), keeping the newest
    IMAGE_SEARCH_DB_BACKUP_GENERATIONS."""
    settings = _settings()
    info = _run(backup_now(settings))
    _echo(f"backed up to {info.key} ({_size(info.size)})")


@index.command(epilog=EXIT_CODES)
@click.option("--key", metavar="KEY", help="The backup to restore (default: the newest; see `index stats`).")
@click.option("--force", is_flag=True, help="Replace the index that exists.")
def restore(key: str | None, force: bool) -> None:
    """Restore a backup into the embedded index. The server must be stopped; every file is checked against
    the backup's manifest before anything is replaced."""
    settings = _settings()
    report = _run(restore_backup(settings, key, replace=force))
    _echo(f"restored {report.points} points from {report.key} (model {report.model_id})")


@index.command(epilog=EXIT_CODES)
@click.option("--wait", is_flag=True, help="Return when the build is done, with what it did.")
def build(wait: bool) -> None:
    """Build the search graph of the points not yet in it now (the server also does this by itself)."""
    settings = _settings()
    result = _run(build_graph(settings, wait=wait))
    if wait and result:
        _echo(json.dumps(result))
    else:
        _echo("graph build started" if settings.qdrant_url == "" else "a Qdrant server builds its own graph")


def main() -> None:
    configure_logging("critical", "console")  # failures are reported as one line each, not logged
    try:
        cli(prog_name="ams-ops")
    except OutputClosed:
        # the reader went away (`| head`): end without a word, as click does for its own output, and with what is
        # still buffered for the standard output going nowhere, not to an error at the interpreter's exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
