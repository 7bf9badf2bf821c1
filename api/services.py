"""What the API process runs besides HTTP: the shared runtime, the reply listener and, in single-process
mode, the processor's consumer."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from api.replies import ReplyListener
from infra.settings import Settings
from processor.consumer import Consumer
from processor.runtime import Runtime
from processor.service import build_consumer

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Services:
    settings: Settings
    runtime: Runtime
    replies: ReplyListener
    consumer: Consumer | None

    @classmethod
    async def start(cls, settings: Settings, *, with_processor: bool | None = None) -> Services:
        """Open everything. The processor runs in this process when asked, or by default when Qdrant is
        embedded (one process per path)."""
        in_process = with_processor if with_processor is not None else settings.embedded_qdrant
        runtime = await Runtime.open(settings, processor=in_process)
        replies = ReplyListener(runtime.connection)
        consumer: Consumer | None = None
        try:
            await replies.start()
            if in_process:
                consumer = build_consumer(runtime)
                await consumer.start()
        except BaseException:
            await replies.close()
            await runtime.close()
            raise
        log.info("services_started", processor_in_process=consumer is not None)
        return cls(settings, runtime, replies, consumer)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.replies.close()
        await self.runtime.close()
