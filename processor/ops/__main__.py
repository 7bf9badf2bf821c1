"""ams-ops: the operator's command line.

    ams-ops dlq list [FILTERS] [--json]          the dead letters in ams.dead (the queue is left as it was)
    ams-ops dlq show ID                          one dead letter: properties, headers, body decoded
    ams-ops dlq replay (FILTERS | --all) [--dry-run]          publish matching dead letters to ams.jobs again
    ams-ops dlq purge (FILTERS | --all) [--dry-run] [--yes]   delete matching dead letters
    ams-ops jobs list [--status S] [--type T] [--code C] [--updated-before WHEN] [--json]   job records, oldest first
    ams-ops jobs show ID                         one job record, as JSON
    ams-ops jobs cancel (ID... | --type T | --updated-before WHEN | --all) [--dry-run] [--yes]   cancel queued jobs
    ams-ops jobs delete-output (ID... | --type T | --updated-before WHEN | --all) [--dry-run] [--yes]
                                                 delete finished generations' outputs now
    ams-ops events watch [--type T] [--status S] [--json] [--count N] [--seconds S]   job ends as they happen
    ams-ops callbacks send [URL] [--job-id ID] [--json]   POST a sample end to URL, or a finished job's end again
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

import os
import sys

import click

from infra.logging import configure_logging
from processor.ops.cli.backfill import backfill
from processor.ops.cli.callbacks import callbacks
from processor.ops.cli.common import EXIT_CODES, OutputClosed
from processor.ops.cli.dlq import dlq
from processor.ops.cli.events import events
from processor.ops.cli.index import index
from processor.ops.cli.jobs import jobs


@click.group(
    epilog=EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"]},
    commands=[dlq, jobs, backfill, events, callbacks, index],
)
def cli() -> None:
    """Operate an AI model server deployment: inspect, replay and purge dead letters; list and cancel jobs,
    delete their outputs; watch job events; send callbacks; backfill, back up and restore the image index.

    Settings come from the same environment as the server (AMQP_URL, AMQP_CONNECT_TIMEOUT_SECONDS,
    R2_*, LOCAL_STORAGE_DIR, ...).
    """


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
