"""The topology of infra/broker.py as a RabbitMQ definitions document (infra/rabbitmq/definitions.json), for the
compose stack to load through the management API. It adds what AMQP cannot declare: the ams-unrouted policy.

python -m infra.broker_definitions           # (re)write infra/rabbitmq/definitions.json
python -m infra.broker_definitions --check   # exit 1 if the committed file differs from the topology
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infra.broker import (
    CAPABILITY_QUEUES,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    MAX_PRIORITY,
    RETRY_DELAY_HEADER,
    RETRY_DELAYS_SECONDS,
    RETRY_EXCHANGE,
    UNROUTED_EXCHANGE,
    UNROUTED_POLICY,
    UNROUTED_QUEUE,
    retry_queue_arguments,
    retry_queue_name,
)

DEFINITIONS_FILE = Path(__file__).resolve().parent / "rabbitmq" / "definitions.json"
VHOST = "/"


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": VHOST,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "vhost": VHOST, "durable": True, "auto_delete": False, "arguments": arguments}


def _binding(source: str, queue: str, routing_key: str = "", arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": VHOST,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": routing_key,
        "arguments": arguments or {},
    }


def definitions() -> dict[str, Any]:
    """The definitions document, in a stable order."""
    capability = {"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": DEAD_EXCHANGE}
    policy, pattern, definition = UNROUTED_POLICY
    return {
        "exchanges": [
            _exchange(JOBS_EXCHANGE, "topic"),
            _exchange(UNROUTED_EXCHANGE, "fanout"),
            _exchange(DEAD_EXCHANGE, "fanout"),
            _exchange(RETRY_EXCHANGE, "headers"),
            _exchange(EVENTS_EXCHANGE, "topic"),
        ],
        "queues": [
            *(_queue(name, capability) for name, _ in CAPABILITY_QUEUES.values()),
            _queue(UNROUTED_QUEUE, {"x-dead-letter-exchange": DEAD_EXCHANGE}),
            _queue(DEAD_QUEUE, {}),
            *(_queue(retry_queue_name(delay), retry_queue_arguments(delay)) for delay in RETRY_DELAYS_SECONDS),
        ],
        "bindings": [
            *(
                _binding(JOBS_EXCHANGE, name, key)
                for name, routing_keys in CAPABILITY_QUEUES.values()
                for key in routing_keys
            ),
            _binding(UNROUTED_EXCHANGE, UNROUTED_QUEUE),
            _binding(DEAD_EXCHANGE, DEAD_QUEUE),
            *(
                _binding(
                    RETRY_EXCHANGE,
                    retry_queue_name(delay),
                    arguments={"x-match": "all", RETRY_DELAY_HEADER: str(delay)},
                )
                for delay in RETRY_DELAYS_SECONDS
            ),
        ],
        "policies": [
            {
                "vhost": VHOST,
                "name": policy,
                "pattern": pattern,
                "apply-to": "exchanges",
                "priority": 0,
                "definition": json.loads(definition),
            },
        ],
    }


def rendered() -> str:
    return json.dumps(definitions(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.broker_definitions", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    args = parser.parse_args()
    if args.check:
        if not DEFINITIONS_FILE.is_file() or DEFINITIONS_FILE.read_text() != rendered():
            sys.exit(f"{DEFINITIONS_FILE} is out of date; run python -m infra.broker_definitions")
        return
    DEFINITIONS_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEFINITIONS_FILE.write_text(rendered())
    sys.stderr.write(f"wrote {DEFINITIONS_FILE}\n")


if __name__ == "__main__":
    main()
