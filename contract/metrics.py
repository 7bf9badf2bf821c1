"""Metrics for operators (Prometheus): job outcomes and durations per job type, recorded by the consumer, and the
depth and consumers of every queue, read from RabbitMQ at each scrape.

One registry per process: the API's GET /metrics serves it, and `python -m processor` serves it on
PROCESSOR_METRICS_PORT.
"""

from __future__ import annotations

from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infra.broker import BrokerUnavailableError, queue_depths

REGISTRY = CollectorRegistry(auto_describe=True)

JOB_OUTCOMES = Counter(
    "ams_jobs",
    "Jobs settled by the processor, by type and outcome (succeeded, retried, deferred: a redelivery waiting for a "
    "run that lives on, dead_lettered, withdrawn, cancelled).",
    ["type", "outcome"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "ams_job_duration_seconds",
    "Time the handler took for a job (a batched job counts the whole batch), by type and outcome.",
    ["type", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
QUEUE_MESSAGES = Gauge(
    "ams_queue_messages",
    "Messages ready in each queue (ams.index, ams.image, ams.voice, ams.callback: each capability's backlog; "
    "ams.dead: dead "
    "letters; ams.retry.*: waiting to retry).",
    ["queue"],
    registry=REGISTRY,
)
QUEUE_CONSUMERS = Gauge("ams_queue_consumers", "Consumers attached to each queue.", ["queue"], registry=REGISTRY)
JOB_EVENTS = Counter(
    "ams_job_events",
    "Job ends announced (the event on ams.events, the callback of a job with a callback URL), by outcome: "
    "published (at once), owed (RabbitMQ did not take it: kept in "
    "the object store), published_late (an owed one, once RabbitMQ took it), deferred (a cancellation the API "
    "could not announce: the processor announces it when the job's message comes up).",
    ["outcome"],
    registry=REGISTRY,
)
OUTPUTS_DELETED = Counter(
    "ams_outputs_deleted",
    "Generated images and voices deleted on purpose, by reason: expired (OUTPUT_TTL_DAYS after their job finished, "
    "by a processor's sweep) or deleted (DELETE /v1/jobs/{id}/output).",
    ["reason"],
    registry=REGISTRY,
)
BROKER_REACHABLE = Gauge(
    "ams_broker_reachable",
    "1 when this scrape read the queues from RabbitMQ; 0 when it could not (the queue gauges are then absent).",
    registry=REGISTRY,
)


def job_settled(job_type: str, outcome: str, seconds: float | None = None) -> None:
    JOB_OUTCOMES.labels(job_type or "unknown", outcome).inc()
    if seconds is not None:
        JOB_DURATION.labels(job_type or "unknown", outcome).observe(seconds)


def job_events(outcome: str, count: int = 1) -> None:
    JOB_EVENTS.labels(outcome).inc(count)


def output_deleted(reason: str) -> None:
    OUTPUTS_DELETED.labels(reason).inc()


async def record_queue_depths(connection: AbstractRobustConnection) -> None:
    """Read every queue's depth and consumers into the gauges. With the broker down the scrape still answers: the
    queue gauges are dropped (stale values would mislead) and ams_broker_reachable says 0."""
    try:
        depths = await queue_depths(connection)
    except BrokerUnavailableError:
        QUEUE_MESSAGES.clear()
        QUEUE_CONSUMERS.clear()
        BROKER_REACHABLE.set(0)
        return
    for queue, (messages, consumers) in depths.items():
        QUEUE_MESSAGES.labels(queue).set(messages)
        QUEUE_CONSUMERS.labels(queue).set(consumers)
    BROKER_REACHABLE.set(1)
