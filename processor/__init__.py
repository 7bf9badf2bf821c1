"""The single consumer: message contract, handlers, model runners, retry and dead-letter policy."""
