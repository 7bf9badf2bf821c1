"""structlog set-up, done once per process."""

from __future__ import annotations

import logging
import sys

import structlog


class _DropChattyLibraries(logging.Filter):
    """open_clip logs every loading step at INFO on the root logger; keep only its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/open_clip/" not in record.pathname


MAX_FIELD_CHARS = 1000


def _truncate_long_strings(_: object, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """User text (prompts, filenames, library messages quoting them) can be long: cut every string field but a
    traceback."""
    for key, value in event_dict.items():
        if key != "exception" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            event_dict[key] = f"{value[:MAX_FIELD_CHARS]}... ({len(value) - MAX_FIELD_CHARS} more characters)"
    return event_dict


_NOISY = ("aio_pika", "aiormq", "botocore", "aiobotocore", "httpx", "urllib3", "PIL", "open_clip")


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route structlog and the standard library through one renderer on stderr."""
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _truncate_long_strings,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _truncate_long_strings,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_DropChattyLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # warnings.warn (torch, PIL, ...) as log records, not raw text on stderr
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").setLevel(max(logging.WARNING, root.level))
