"""The one-process mode: a processor and the API in one process, sharing one plumbing (object store, broker
connection, publisher), one CLIP model and the image index. Jobs still go through RabbitMQ; the processor hands
its replies to the API's reply queue over in memory through the publisher they share (Publisher.receive_locally).

It is the default `run` (scripts/run.sh), because the embedded image index has one owning process. It sits above
both siblings: api/ and processor/ never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from api.services import Services
from infra.settings import Settings
from infra.startup import Plumbing
from processor.service import ProcessorService

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class OneProcess:
    plumbing: Plumbing
    services: Services
    processor: ProcessorService | None

    @classmethod
    async def start(cls, settings: Settings, *, with_processor: bool = True) -> OneProcess:
        """Start the processor (with_processor, for the capabilities the settings give) and the API over it."""
        plumbing = await Plumbing.open(settings)
        processor: ProcessorService | None = None
        try:
            if with_processor and settings.processor_capabilities:
                processor = await ProcessorService.start(settings, plumbing=plumbing)
            runtime = processor.runtime if processor is not None else None
            services = await Services.start(
                settings,
                plumbing=plumbing,
                index=runtime.index if runtime is not None else None,
                clip=runtime.clip if runtime is not None else None,
                probes=[processor.readiness] if processor is not None else [],
                own_index=with_processor and (runtime is None or runtime.index is None),
            )
        except BaseException:
            if processor is not None:
                await processor.stop()
            await plumbing.close()
            raise
        log.info("one_process_started", capabilities=list(processor.runtime.capabilities) if processor else [])
        return cls(plumbing, services, processor)

    async def stop(self) -> None:
        """Stop the processor first (it finishes its batch), then the API, then close the plumbing."""
        try:
            try:
                if self.processor is not None:
                    await self.processor.stop()
            finally:  # the API's own stop (its resender, its reply queue, an index it owns) runs all the same
                await self.services.stop()
        finally:
            await self.plumbing.close()
