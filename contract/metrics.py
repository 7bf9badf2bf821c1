"""Job metrics for operators (Prometheus): outcomes and durations per job type, recorded by the consumer.

One registry per process: the API's GET /metrics serves it (with the queue depths), and `python -m processor`
serves it on PROCESSOR_METRICS_PORT.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

JOB_OUTCOMES = Counter(
    "ams_jobs",
    "Jobs settled by the processor, by type and outcome (succeeded, retried, dead_lettered).",
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
    "Messages ready in each queue (ams.jobs: the backlog, ams.dead: dead letters, ams.retry.*: waiting to retry).",
    ["queue"],
    registry=REGISTRY,
)
QUEUE_CONSUMERS = Gauge("ams_queue_consumers", "Consumers attached to each queue.", ["queue"], registry=REGISTRY)


def job_settled(job_type: str, outcome: str, seconds: float | None = None) -> None:
    JOB_OUTCOMES.labels(job_type or "unknown", outcome).inc()
    if seconds is not None:
        JOB_DURATION.labels(job_type or "unknown", outcome).observe(seconds)
