"""What every ams-ops command shares: its exit codes and failures, the standard output, the settings, the run of a
command's work, progress bars, and the operator's yes or no."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import IO, Any, TypeVar

import click

from infra.settings import Settings, SettingsError
from infra.vectors import SnapshotsUnsupportedError
from processor.ops.errors import OperationFailedError
from processor.ops.filters import parse_when

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


def echo(message: str) -> None:
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


def read_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise BadConfiguration(f"configuration error: {exc}") from None


def run(work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except OperationFailedError as exc:
        raise CommandFailed(str(exc)) from None
    except SnapshotsUnsupportedError as exc:
        raise BadConfiguration(str(exc)) from None
    except SettingsError as exc:  # a setting only this command needs
        raise BadConfiguration(f"configuration error: {exc}") from None


@contextlib.contextmanager
def progress(length: int, label: str, visible: bool) -> Iterator[Callable[[int], object]]:
    """A progress bar on stderr when that is a terminal (not in logs or pipes); `advance(n)` moves it."""
    if not visible or length == 0 or not sys.stderr.isatty():
        yield lambda _steps: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update


async def ask(question: str) -> bool:
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
