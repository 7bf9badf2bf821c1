"""The one error the operator commands raise for a failure that is not the caller's usage."""

from __future__ import annotations


class OperationFailedError(Exception):
    """An operation could not be done: RabbitMQ, storage or the API unreachable, or what was asked for is absent.

    Its message is one line that says what failed and where; the CLI prints it and exits with status 1.
    """
