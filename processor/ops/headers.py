"""AMQP header names the processor writes when it retries or dead-letters a job, and the one a replay adds.

They are the contract between the processor (which writes them) and the operator CLI (which reads them).
"""

from __future__ import annotations

from infra.broker import (
    ATTEMPTS_HEADER,
    DEFERRAL_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    LEGACY_RETRY_DELAY_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    RETRY_DELAY_HEADER,
    ROUTING_KEY_HEADER,
)

__all__ = [
    "ATTEMPTS_HEADER",
    "FIRST_FAILURE_HEADER",
    "LAST_FAILURE_HEADER",
    "NOT_REPLAYED_HEADERS",
    "REASON_CODE_HEADER",
    "REASON_HEADER",
    "REPLAYED_AT_HEADER",
    "ROUTING_KEY_HEADER",
]

REPLAYED_AT_HEADER = "x-ams-replayed-at"

# dropped from a replayed copy so the job starts over with its full number of attempts, and not as a deferred
# redelivery (processor/liveness.py)
NOT_REPLAYED_HEADERS = frozenset({ATTEMPTS_HEADER, RETRY_DELAY_HEADER, LEGACY_RETRY_DELAY_HEADER, DEFERRAL_HEADER})
