"""Why a job failed, as its record, its reply and its end's event say it: a stable code and a readable message."""

from __future__ import annotations

import msgspec


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str
