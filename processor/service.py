"""The processor as a service: the handlers of the capabilities it serves, wired to its runtime, behind one consumer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import structlog

from contract.bucket_events import BUCKET_EVENT
from contract.callbacks import JOB_CALLBACK
from contract.clock import UniqueClock
from contract.jobs import JobStore
from contract.messages import IMAGE_DELETE, IMAGE_EMBED, IMAGE_GENERATE, IMAGE_INDEX, VOICE_GENERATE
from infra.readiness import Checks
from infra.settings import Settings, capability_off
from infra.startup import Plumbing
from infra.storage import ObjectStore, StorageError
from infra.vectors.backup import archive_prefix
from processor.consumer import Consumer
from processor.handlers.base import Handler
from processor.handlers.bucket_event import BucketEventHandler
from processor.handlers.image_delete import ImageDeleteHandler, ImageDeleter
from processor.handlers.image_embed import ImageEmbedHandler
from processor.handlers.image_generate import ImageGenerateHandler
from processor.handlers.image_index import ImageIndexHandler
from processor.handlers.job_callback import CallbackHandler
from processor.handlers.voice_generate import VoiceGenerateHandler
from processor.interrupted_runs import InterruptedRuns
from processor.liveness import sweep_heartbeats
from processor.retrying import TRANSIENT_ERRORS
from processor.runtime import Runtime

log = structlog.get_logger(__name__)

_FEATURES = {"index": "image search", "image": "image generation", "voice": "voice generation", "callback": "callbacks"}


def _refusal(runtime: Runtime, capability: str) -> str:
    """Why a job of this capability is refused here."""
    if not runtime.settings.capability_enabled(capability):
        return f"{_FEATURES[capability]} is disabled on this processor ({capability_off(capability)})"
    served = ",".join(runtime.capabilities) or "none"
    return f"this processor does not serve the {capability} capability (PROCESSOR_CAPABILITIES={served})"


def build_handlers(runtime: Runtime) -> tuple[dict[str, Handler], dict[str, str]]:
    """Handlers for the capabilities this processor serves, and for each other job type the reason it is refused
    (such messages reach it only by mistake: each capability has a queue of its own)."""
    settings = runtime.settings
    handlers: dict[str, Handler] = {}
    disabled: dict[str, str] = {}
    if runtime.index is not None and runtime.clip is not None:
        indexer = ImageIndexHandler(
            store=runtime.store,
            index=runtime.index,
            embedder=runtime.clip,
            bucket=runtime.bucket,
            batch_size=settings.image_search_batch_size,
            max_pixels=settings.image_search_max_pixels,
            max_bytes=settings.image_search_max_bytes,
            max_elements=settings.image_search_max_elements,
            clock=UniqueClock(),
            thumbnail_side=settings.thumbnail_max_side if settings.thumbnails_at_index else None,
            decode_threads=settings.image_decode_threads,
        )
        deleter = ImageDeleter(store=runtime.store, index=runtime.index, bucket=runtime.bucket)
        handlers[IMAGE_INDEX] = indexer
        handlers[IMAGE_DELETE] = ImageDeleteHandler(deleter)
        handlers[IMAGE_EMBED] = ImageEmbedHandler(
            embedder=runtime.clip,
            batch_size=settings.image_search_batch_size,
            max_pixels=settings.image_search_max_pixels,
        )
        handlers[BUCKET_EVENT] = BucketEventHandler(
            indexer=indexer,
            deleter=deleter,
            bucket=runtime.bucket,
            prefixes=settings.watch_prefixes,
            max_bytes=settings.image_search_max_bytes,
        )
    else:
        for message_type in (IMAGE_INDEX, IMAGE_DELETE, BUCKET_EVENT, IMAGE_EMBED):
            disabled[message_type] = _refusal(runtime, "index")
    if runtime.generator is not None:
        handlers[IMAGE_GENERATE] = ImageGenerateHandler(
            store=runtime.store, generator=runtime.generator, settings=settings
        )
    else:
        disabled[IMAGE_GENERATE] = _refusal(runtime, "image")
    if runtime.voice is not None:
        handlers[VOICE_GENERATE] = VoiceGenerateHandler(store=runtime.store, cloner=runtime.voice, settings=settings)
    else:
        disabled[VOICE_GENERATE] = _refusal(runtime, "voice")
    if runtime.callbacks is not None:
        handlers[JOB_CALLBACK] = CallbackHandler(
            client=runtime.callbacks,
            hosts=settings.callback_hosts,
            secrets=settings.callback_secrets,
            store=runtime.store,
            max_attempts=settings.max_attempts,
        )
    else:
        disabled[JOB_CALLBACK] = _refusal(runtime, "callback")
    return handlers, disabled


def build_consumer(runtime: Runtime) -> Consumer:
    handlers, disabled = build_handlers(runtime)
    return Consumer(
        runtime.plumbing.connection,
        runtime.plumbing.publisher,
        handlers,
        disabled,
        max_attempts=runtime.settings.max_attempts,
        jobs=JobStore(runtime.store, runtime.settings.job_record_ttl_days),
        store=runtime.store,
        capabilities=runtime.capabilities,
        max_interrupted_runs=runtime.settings.max_interrupted_runs,
        announce=runtime.settings.job_events_enabled,
    )


SWEEP_INTERVAL_SECONDS = 3600
# the first sweep comes soon after start, so a processor restarted more often than hourly still sweeps
SWEEP_FIRST_AFTER_SECONDS = 60


async def _expire_job_records(
    jobs: JobStore,
    output_ttl_days: float | None,
    runs: InterruptedRuns,
    kept: timedelta,
    store: ObjectStore,
    uploads: str,
) -> None:
    """Delete expired job records (JOB_RECORD_TTL_DAYS, `kept`), generated outputs past OUTPUT_TTL_DAYS, counts of
    interrupted runs left behind longer than `kept` (processor/interrupted_runs.py) and heartbeats no longer written
    (processor/liveness.py), and remove what writes under `uploads` (the index backups' keys) left in the store when
    they never ended (ObjectStore.remove_abandoned_writes), a minute after start and then once an hour; any processor
    may: deletes and aborts are idempotent and the records' writes conditional."""
    wait = SWEEP_FIRST_AFTER_SECONDS
    while True:
        await asyncio.sleep(wait)
        wait = SWEEP_INTERVAL_SECONDS
        await _remove_abandoned_writes(store, uploads)
        try:
            swept = await jobs.sweep(output_ttl_days)
            counts = await runs.sweep(kept)
            heartbeats = await sweep_heartbeats(store)
        except (StorageError, *TRANSIENT_ERRORS) as exc:  # down, or refusing these credentials: tried again
            log.warning("job_record_sweep_failed", error=str(exc))
            continue
        except Exception:  # a bug must not stop expiry for good: logged, and the next sweep tries again
            log.exception("job_record_sweep_crashed")
            continue
        if swept.records:
            log.info("job_records_expired", removed=swept.records)
        if swept.outputs:
            log.info("job_outputs_expired", removed=swept.outputs)
        if counts:
            log.info("interrupted_runs_expired", removed=counts)
        if heartbeats:
            log.info("heartbeats_expired", removed=heartbeats)


async def _remove_abandoned_writes(store: ObjectStore, prefix: str) -> None:
    """One sweep's ObjectStore.remove_abandoned_writes under `prefix`; a failure is logged (a store that is down, or
    that refuses to list uploads in parts to these credentials), and the next sweep tries again."""
    try:
        removed = await store.remove_abandoned_writes(prefix)
    except StorageError as exc:
        log.warning("abandoned_writes_sweep_failed", error=str(exc))
        return
    except Exception:  # a bug must not stop the sweeps for good
        log.exception("abandoned_writes_sweep_crashed")
        return
    if removed:
        log.info("abandoned_writes_removed", removed=removed)


@dataclass(slots=True)
class ProcessorService:
    """A running processor: its runtime, its consumer, and the hourly expiry of job records and outputs."""

    runtime: Runtime
    consumer: Consumer
    sweeper: asyncio.Task[None]

    @classmethod
    async def start(cls, settings: Settings, *, plumbing: Plumbing | None = None) -> ProcessorService:
        runtime = await Runtime.open(settings, plumbing=plumbing)
        consumer = build_consumer(runtime)
        try:
            await consumer.start()
        except BaseException:
            await runtime.close()
            raise
        jobs = JobStore(runtime.store, settings.job_record_ttl_days)
        runs = InterruptedRuns(runtime.store, settings.max_interrupted_runs)
        kept = timedelta(days=settings.job_record_ttl_days)
        return cls(
            runtime,
            consumer,
            asyncio.create_task(
                _expire_job_records(
                    jobs,
                    settings.output_ttl_days,
                    runs,
                    kept,
                    runtime.store,
                    archive_prefix(settings.image_search_db_r2_key),
                ),
                name="job-record-expiry",
            ),
        )

    async def readiness(self) -> Checks:
        """What the processor owns: its consumer, its models and (when it indexes) the image index."""
        return {"processor": "ok" if self.consumer.is_running else "stopped", **await self.runtime.readiness()}

    async def stop(self) -> None:
        """Finish the batch in hand, hand the rest back to the broker, close."""
        self.sweeper.cancel()
        await asyncio.gather(self.sweeper, return_exceptions=True)
        try:
            await self.consumer.stop()
        finally:
            await self.runtime.close()
