"""Readiness checks, shared by the API's and the processor's /readyz: each part answers "ok" or says what is wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

PROBE_TIMEOUT_SECONDS = 3

Checks = dict[str, str]
ReadinessProbe = Callable[[], Awaitable[Checks]]


async def probe(check: Awaitable[None]) -> str:
    """ "ok" when `check` completes within the probe timeout, else what went wrong."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await check
    except TimeoutError:
        return f"error: no answer within {PROBE_TIMEOUT_SECONDS} s"
    except Exception as exc:
        return f"error: {exc}"
    return "ok"


def loaded(model: object | None) -> str:
    return "ok" if model is not None else "not loaded"


def readiness_body(checks: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The /readyz body and status code: 200 when every check is ok, else 503 naming the failing ones."""
    failing = sorted(name for name, state in checks.items() if state != "ok")
    body: dict[str, Any] = {"status": "ready" if not failing else "not_ready", "checks": dict(checks)}
    if failing:
        body["failing"] = failing
    return body, 200 if not failing else 503
