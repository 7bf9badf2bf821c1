"""What the API process runs besides HTTP: the plumbing (object store, broker), the reply listener, and for
search the image index, the query encoder and the thumbnails.

Run alone (`python -m api`) it opens its own plumbing, loads the CLIP text tower only, and uses the image index
without owning it (a Qdrant server, or the embedded engine the indexing processor runs). The one-process
launcher hands it the processor's plumbing, index and model, and the processor's readiness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractRobustConnection

from api.queries import QueryEncoder
from api.replies import ReplyListener
from api.resend import Resender
from api.thumbnails import Thumbnails
from api.withdrawals import Withdrawals
from contract.imaging import configure_pixel_limit
from contract.jobs import JobStore
from infra.broker import Publisher
from infra.readiness import Checks, ReadinessLog, ReadinessProbe, loaded, probe
from infra.settings import Settings
from infra.startup import OpenedIndex, Plumbing, open_image_index
from infra.storage import ObjectStore
from infra.vectors import VectorIndex
from models.clip import ClipEmbedder

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Services:
    settings: Settings
    plumbing: Plumbing
    replies: ReplyListener
    resender: Resender
    withdrawals: Withdrawals
    index: VectorIndex | None = None
    queries: QueryEncoder | None = None
    thumbnails: Thumbnails | None = None
    probes: Sequence[ReadinessProbe] = ()
    # what /readyz logs of its checks (their states' changes, a failure's error)
    readiness_log: ReadinessLog = field(default_factory=ReadinessLog)
    # set when the server is asked to stop: requests that wait on a job's record answer at once
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _owned_index: OpenedIndex | None = field(default=None, repr=False)
    _owns_plumbing: bool = field(default=True, repr=False)

    @property
    def store(self) -> ObjectStore:
        return self.plumbing.store

    @property
    def publisher(self) -> Publisher:
        return self.plumbing.publisher

    @property
    def connection(self) -> AbstractRobustConnection:
        return self.plumbing.connection

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        plumbing: Plumbing | None = None,
        index: VectorIndex | None = None,
        clip: ClipEmbedder | None = None,
        probes: Sequence[ReadinessProbe] = (),
        own_index: bool = False,
    ) -> Services:
        """Open what the API needs that it was not given. Without `clip`, the text tower is loaded; without
        `index`, the image index is attached to, or owned with `own_index` (the one-process mode when its
        processor does not index)."""
        configure_pixel_limit(settings.image_search_max_pixels)
        own = plumbing is None
        plumbing = plumbing or await Plumbing.open(settings)
        services = cls(
            settings,
            plumbing,
            ReplyListener(plumbing.connection, plumbing.publisher),
            Resender(JobStore(plumbing.store, settings.job_record_ttl_days), plumbing.publisher),
            Withdrawals(JobStore(plumbing.store, settings.job_record_ttl_days)),
            probes=probes,
            _owns_plumbing=own,
        )
        try:
            await services.replies.start()
            if settings.image_search_enabled:
                if clip is None:
                    clip = await asyncio.to_thread(ClipEmbedder.load, settings, image_tower=False)
                if index is None:
                    services._owned_index = await open_image_index(
                        settings, services.store, clip.model_id, clip.dim, attach=not own_index
                    )
                    index = services._owned_index.index
                services.index = index
                services.thumbnails = Thumbnails(services.store, settings)
                services.queries = QueryEncoder(
                    clip, services.publisher, services.replies, settings.sync_timeout_seconds
                )
        except BaseException:
            await services.stop()
            raise
        log.info(
            "api_services_started",
            image_search=settings.image_search_enabled,
            image_tower=services.queries.image_tower if services.queries is not None else None,
        )
        return services

    async def readiness(self) -> Checks:
        """What this process owns: broker, storage, the query model and the index; then the given probes."""
        checks: Checks = {
            "broker": self.plumbing.broker_state() if self.replies.is_connected else "disconnected",
            "storage": await probe(self.store.ping()),
        }
        if self.settings.image_search_enabled:
            checks["clip_model"] = loaded(self.queries)
            checks["qdrant"] = await probe(self.index.ping()) if self.index is not None else "not opened"
        for extra in self.probes:
            checks.update(await extra())
        return checks

    async def stop(self) -> None:
        await self.resender.close()
        await self.withdrawals.close()
        await self.replies.close()
        if self._owned_index is not None:
            await self._owned_index.close()
        if self._owns_plumbing:
            await self.plumbing.close()
