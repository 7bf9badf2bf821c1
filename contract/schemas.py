"""JSON Schemas of the message contract, generated from the msgspec Structs.

python -m contract.schemas            # (re)write docs/schemas/<type>.v<version>.json
python -m contract.schemas --check    # exit 1 if the committed schemas differ from the Structs
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import msgspec

from contract.events import JOB_FINISHED, JobFinishedV1
from contract.messages import JOB_TYPES
from infra.broker import EVENTS_EXCHANGE, JOBS_EXCHANGE, capability_of, queue_of

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def schema_files() -> dict[str, str]:
    """File name -> schema text, one per job type and one per event."""
    files = {}
    for message_type, struct in sorted(JOB_TYPES.items()):
        amqp = {
            "exchange": JOBS_EXCHANGE,
            "routing_key": message_type,
            "type": message_type,
            "queue": queue_of(capability_of(message_type) or ""),
        }
        files.update(_schema_file(message_type, struct, amqp))
    amqp = {"exchange": EVENTS_EXCHANGE, "routing_key": "<job type>.<status>", "type": JOB_FINISHED}
    files.update(_schema_file(JOB_FINISHED, JobFinishedV1, amqp))
    return files


def _schema_file(message_type: str, struct: type[msgspec.Struct], amqp: dict[str, str]) -> dict[str, str]:
    version = next(field.default for field in msgspec.structs.fields(struct) if field.name == "version")
    schema = msgspec.json.schema(struct)
    for definition in schema.get("$defs", {}).values():
        if "description" in definition:
            definition["description"] = inspect.cleandoc(definition["description"])
    document = {"$schema": _DRAFT, "title": f"{message_type} v{version}", "x-amqp": amqp, **schema}
    return {f"{message_type}.v{version}.json": json.dumps(document, indent=2, ensure_ascii=False) + "\n"}


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing, different, or no longer generated."""
    wanted = schema_files()
    present = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    stale = [
        name
        for name, text in wanted.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    return sorted(stale + sorted(present - set(wanted)))


def write(directory: Path = SCHEMA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = schema_files()
    for path in directory.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    for name, text in wanted.items():
        (directory / name).write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m contract.schemas", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/schemas is out of date")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="where the schemas live (default: %(default)s)")
    args = parser.parse_args()
    if args.check:
        stale = stale_files(args.dir)
        if stale:
            sys.exit(f"stale schemas in {args.dir}: {', '.join(stale)}; run python -m contract.schemas")
        return
    write(args.dir)
    sys.stderr.write(f"wrote {len(schema_files())} schemas to {args.dir}\n")


if __name__ == "__main__":
    main()
