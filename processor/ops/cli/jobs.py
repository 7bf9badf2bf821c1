"""`ams-ops jobs`: list and show job records, cancel queued jobs, delete the outputs of finished ones."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from contract.jobs import JobRecord
from infra.settings import Settings
from processor.ops.cli.common import EXIT_CODES, When, ask, echo, read_settings, run
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


@click.group(epilog=EXIT_CODES)
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
    matching, total = run(list_jobs(read_settings(), selection))
    if as_json:
        echo(jobs_json(matching))
    elif not total:
        echo("no job records")
    elif not matching:
        echo(f"no job records match ({total} in all)")
    else:
        echo(jobs_table(matching))
        echo(f"\n{len(matching)} of {total} job records")


@jobs.command("show", epilog=EXIT_CODES)
@click.argument("job_id", metavar="ID")
def show_job(job_id: str) -> None:
    """One job record, whole, as JSON."""
    echo(job_json(run(get_job(read_settings(), job_id))))


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
                echo(jobs_table(matching))
            echo(wording.would.format(n=len(matching)))
            return None
        if matching and not yes and not await ask(wording.ask.format(n=len(matching))):
            echo(wording.declined)
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
    settings = read_settings()
    wording = _Wording("would cancel {n} queued jobs", "Cancel {n} queued jobs?", "cancelled 0")

    async def work() -> None:
        chosen = await choice.ids(settings, "queued", _is_queued, wording, dry_run=dry_run, yes=yes)
        if chosen is not None:
            echo(_cancel_summary(await cancel_jobs(settings, chosen)))

    run(work())


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
    settings = read_settings()
    wording = _Wording("would delete {n} outputs", "Delete the outputs of {n} jobs?", "deleted 0")

    async def work() -> None:
        chosen = await choice.ids(settings, "succeeded", has_output, wording, dry_run=dry_run, yes=yes)
        if chosen is not None:
            echo(_output_summary(await delete_outputs(settings, chosen)))

    run(work())


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
