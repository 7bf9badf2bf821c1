"""The processor as a service: its handlers wired to the shared runtime, behind one consumer."""

from __future__ import annotations

from contract.bucket_events import BUCKET_EVENT
from contract.clock import UniqueClock
from contract.jobs import JobStore
from contract.messages import IMAGE_DELETE, IMAGE_GENERATE, IMAGE_INDEX, VOICE_GENERATE
from processor.consumer import Consumer
from processor.handlers.base import Handler
from processor.handlers.bucket_event import BucketEventHandler
from processor.handlers.image_delete import ImageDeleteHandler, ImageDeleter
from processor.handlers.image_generate import ImageGenerateHandler
from processor.handlers.image_index import ImageIndexHandler
from processor.handlers.voice_generate import VoiceGenerateHandler
from processor.runtime import Runtime


def build_handlers(runtime: Runtime) -> tuple[dict[str, Handler], dict[str, str]]:
    """Handlers for the enabled features, and for each disabled job type the reason it is refused."""
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
            max_elements=settings.image_search_max_elements,
            clock=UniqueClock(),
        )
        deleter = ImageDeleter(store=runtime.store, index=runtime.index, bucket=runtime.bucket)
        handlers[IMAGE_INDEX] = indexer
        handlers[IMAGE_DELETE] = ImageDeleteHandler(deleter)
        handlers[BUCKET_EVENT] = BucketEventHandler(
            indexer=indexer,
            deleter=deleter,
            bucket=runtime.bucket,
            prefixes=settings.watch_prefixes,
            max_bytes=settings.image_search_max_bytes,
        )
    else:
        for message_type in (IMAGE_INDEX, IMAGE_DELETE, BUCKET_EVENT):
            disabled[message_type] = "image search is disabled on this processor (IMAGE_SEARCH_ENABLED=0)"
    if runtime.generator is not None:
        handlers[IMAGE_GENERATE] = ImageGenerateHandler(
            store=runtime.store, generator=runtime.generator, settings=settings
        )
    else:
        disabled[IMAGE_GENERATE] = "image generation is disabled on this processor (IMAGE_ENABLED=0)"
    if runtime.voice is not None:
        handlers[VOICE_GENERATE] = VoiceGenerateHandler(store=runtime.store, cloner=runtime.voice, settings=settings)
    else:
        disabled[VOICE_GENERATE] = "voice generation is disabled on this processor (VOICE_ENABLED=0)"
    return handlers, disabled


def build_consumer(runtime: Runtime) -> Consumer:
    handlers, disabled = build_handlers(runtime)
    return Consumer(
        runtime.connection,
        runtime.publisher,
        handlers,
        disabled,
        max_attempts=runtime.settings.max_attempts,
        jobs=JobStore(runtime.store),
    )
