"""Readiness checks, shared by the API's and the processor's /readyz: each part answers "ok" or says what is wrong.

/readyz is open (no API key), so what it says of a failing part is a short state ("unavailable", "refused",
"restart needed", "no answer within 3 s", "not loaded"); the error behind a failed probe, which may name storage
paths, buckets or hosts, goes to the log only (ReadinessLog).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from infra.storage.base import StorageError, StorageUnavailableError
from infra.vectors.base import EngineProtocolMismatchError

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 3
# a failing check whose state holds but whose error changes is logged again at most this often
ERROR_LOG_INTERVAL_SECONDS = 60.0

Checks = dict[str, str]
ReadinessProbe = Callable[[], Awaitable[Checks]]


class Failed(str):
    """A failed probe's state, as /readyz shows it, carrying the error behind it for the log (`error`)."""

    error: str

    def __new__(cls, state: str, error: str) -> Failed:
        failed = super().__new__(cls, state)
        failed.error = error
        return failed


async def probe(check: Awaitable[None]) -> str:
    """ "ok" when `check` completes within the probe timeout, else a Failed state: "no answer within 3 s",
    "unavailable" (the part is down or unreachable; retrying may help), "refused" (the object store refuses this
    server's requests for good: credentials, a bucket policy), "restart needed" (the embedded index's engine speaks
    another protocol version: only restarting the server that owns the index helps) or "error" (anything else)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await check
    except TimeoutError:
        waited = f"no answer within {PROBE_TIMEOUT_SECONDS} s"
        return Failed(waited, waited)
    except EngineProtocolMismatchError as exc:
        return Failed("restart needed", _described(exc))
    except (StorageUnavailableError, ConnectionError, OSError) as exc:
        return Failed("unavailable", _described(exc))
    except StorageError as exc:
        return Failed("refused", _described(exc))
    except Exception as exc:
        return Failed("error", _described(exc))
    return "ok"


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def loaded(model: object | None) -> str:
    return "ok" if model is not None else "not loaded"


def readiness_body(checks: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The /readyz body and status code: 200 when every check is ok, else 503 naming the failing ones. The body
    has each check's state only, never a Failed state's error."""
    failing = sorted(name for name, state in checks.items() if state != "ok")
    body: dict[str, Any] = {
        "status": "ready" if not failing else "not_ready",
        "checks": {name: str(state) for name, state in checks.items()},
    }
    if failing:
        body["failing"] = failing
    return body, 200 if not failing else 503


@dataclass(slots=True)
class _Logged:
    state: str
    error: str
    at: float


class ReadinessLog:
    """The log of one /readyz's checks, for operators: a check that fails is logged (readiness_check_failing, with
    its error), and again when its state changes, or when its error changes but not sooner than
    ERROR_LOG_INTERVAL_SECONDS after the last line; one that is ok again is logged once (readiness_check_ok). A probe
    every second logs nothing while nothing changes."""

    def __init__(self) -> None:
        self._logged: dict[str, _Logged] = {}

    def record(self, checks: Mapping[str, str]) -> None:
        now = time.monotonic()
        for name, state in checks.items():
            error = getattr(state, "error", "")
            last = self._logged.get(name)
            if state == "ok":
                if last is not None and last.state != "ok":
                    log.info("readiness_check_ok", check=name, was=last.state)
            elif (
                last is None
                or last.state != state
                or (last.error != error and now - last.at >= ERROR_LOG_INTERVAL_SECONDS)
            ):
                log.warning("readiness_check_failing", check=name, state=str(state), error=error or None)
            else:
                continue
            self._logged[name] = _Logged(str(state), error, now)
