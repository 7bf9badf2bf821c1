"""What every server entry point does around its work: settings checked first (a bad value fails in a moment,
before any model library is imported), logging configured once, then the service run until it stops; a start-up
failure ends the process with one line and status 1."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from infra.cpu import share_cpu_politely
from infra.logging import configure_logging
from infra.settings import Settings, SettingsError


def run_service(serve: Callable[[Settings], Coroutine[Any, Any, None]]) -> None:
    share_cpu_politely()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    from infra.startup import StartupError

    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        sys.exit(f"start-up failed: {exc}")
