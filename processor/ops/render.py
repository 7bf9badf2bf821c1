"""Dead letters as text: a table, JSON, and the full view of one letter with its body decoded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec

from contract.messages import JSON, MSGPACK
from processor.ops.letters import DeadLetter

COLUMNS = ("MESSAGE ID", "TYPE", "REASON", "ATTEMPTS", "FIRST FAILURE", "LAST FAILURE")
MISSING = "-"
_LONG_STRING = 512  # longer strings in a decoded body are shortened to their start and length
_TEXT_PREVIEW = 2000
_HEX_PREVIEW = 256


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns under their names, two spaces apart."""
    widths = [max(len(row[column]) for row in [columns, *rows]) for column in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [columns, *rows]
    )


def letters_table(letters: list[DeadLetter]) -> str:
    return table(
        COLUMNS,
        [
            tuple(
                MISSING if value is None else str(value)
                for value in (
                    letter.message_id,
                    letter.type,
                    letter.reason_code,
                    letter.attempts,
                    letter.first_failed_at,
                    letter.last_failed_at,
                )
            )
            for letter in letters
        ],
    )


def letters_json(letters: list[DeadLetter]) -> str:
    return json.dumps([letter.summary() for letter in letters], indent=2, ensure_ascii=False)


def letter_details(letter: DeadLetter) -> str:
    """Everything about one letter: the failure, its AMQP properties and headers, and its body decoded."""
    reason = ": ".join(part for part in (letter.reason_code, letter.reason) if part)
    overview = (
        ("message id", letter.message_id),
        ("type", letter.type),
        ("routing key", letter.routing_key),
        ("reason", reason or None),
        ("attempts", letter.attempts),
        ("first failure", letter.first_failed_at),
        ("last failure", letter.last_failed_at),
    )
    lines = [f"{name:<14} {MISSING if value is None else value}" for name, value in overview]
    lines += ["", "properties", *_fields(letter.properties), "", "headers", *_fields(letter.headers)]
    lines += ["", f"body ({letter.content_type or 'no content type'}, {letter.size} bytes)", body_text(letter)]
    return "\n".join(lines)


def body_text(letter: DeadLetter) -> str:
    """JSON pretty-printed; msgpack decoded and shown as JSON, bytes as "<N bytes>"; anything else previewed."""
    content_type = (letter.content_type or "").split(";")[0].strip().lower()
    try:
        if content_type == JSON or content_type.endswith("+json"):
            return _pretty(json.loads(letter.body))
        if content_type == MSGPACK:
            return _pretty(msgspec.msgpack.decode(letter.body))
    except RecursionError:  # what a malformed_body letter may be: nested deeper than a decoder goes
        return f"(does not decode as {content_type}: nested too deeply)\n{_preview(letter.body)}"
    except (ValueError, msgspec.DecodeError) as exc:
        return f"(does not decode as {content_type}: {exc})\n{_preview(letter.body)}"
    return _preview(letter.body)


def _fields(values: dict[str, Any]) -> list[str]:
    if not values:
        return [f"  {MISSING}"]
    return [
        f"  {name}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
        for name, value in sorted(values.items())
    ]


def _pretty(value: object) -> str:
    return json.dumps(_displayable(value), indent=2, ensure_ascii=False, default=str)


def _displayable(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > _LONG_STRING:
        return f"{value[:64]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {str(name): _displayable(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_displayable(item) for item in value]
    return value


def _preview(body: bytes) -> str:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        chunk = body[:_HEX_PREVIEW]
        lines = [f"{offset:08x}  {chunk[offset : offset + 16].hex(' ')}" for offset in range(0, len(chunk), 16)]
        more = [f"… {len(body) - len(chunk)} more bytes"] if len(body) > len(chunk) else []
        return "\n".join(["(binary, first bytes in hex)", *lines, *more])
    if len(text) > _TEXT_PREVIEW:
        return f"{text[:_TEXT_PREVIEW]}\n… {len(text) - _TEXT_PREVIEW} more characters"
    return text
