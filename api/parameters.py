"""Request parameters that several endpoints take: the Idempotency-Key header and the callback_url query."""

from __future__ import annotations

from litestar.params import Parameter

from api.jobs import MAX_IDEMPOTENCY_KEY_LENGTH
from contract.callbacks import CALLBACK_URL_PATTERN, MAX_URL_CHARS
from contract.messages import NON_BLANK

IDEMPOTENCY_KEY = Parameter(
    header="Idempotency-Key",
    required=False,
    description="a retried request with the same key returns the same job (and its result) instead of starting "
    "another; one that finds the job unfinished waits for it as the first does",
    schema_extra={"minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH, "pattern": NON_BLANK},
)

CALLBACK_URL = Parameter(
    query="callback_url",
    required=False,
    description="where the job's end is POSTed once it is stored (README, Callbacks), whether the answer was the "
    "result or 202 with the job; an http(s) URL on a host that CALLBACK_HOSTS allows",
    max_length=MAX_URL_CHARS,
    pattern=CALLBACK_URL_PATTERN,
)
