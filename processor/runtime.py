"""What a processor opens once at start-up: the plumbing (object store, broker), and for each capability it
serves, its models and stores: `index` the CLIP model (both towers) and the image index, `image` the image
generator, `voice` the voice cloner.

Run alone (`python -m processor`) it opens its own plumbing; the one-process launcher hands it the plumbing it
shares with the API.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import structlog

from contract.imaging import configure_pixel_limit
from infra.readiness import Checks, loaded, probe
from infra.settings import Settings
from infra.startup import OpenedIndex, Plumbing, StartupError, open_image_index
from infra.storage import ObjectStore
from infra.vectors import VectorIndex
from models.clip import ClipEmbedder
from models.diffusion import ImageGenerator
from models.voice import VoiceCloner
from processor.handlers.callback_client import open_client

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    plumbing: Plumbing
    capabilities: tuple[str, ...]
    opened_index: OpenedIndex | None = None
    clip: ClipEmbedder | None = None
    generator: ImageGenerator | None = None
    voice: VoiceCloner | None = None
    callbacks: httpx.AsyncClient | None = None
    owns_plumbing: bool = field(default=True)

    @property
    def store(self) -> ObjectStore:
        return self.plumbing.store

    @property
    def index(self) -> VectorIndex | None:
        """The image index, when this processor indexes."""
        return self.opened_index.index if self.opened_index is not None else None

    @property
    def bucket(self) -> str:
        return self.plumbing.bucket

    @classmethod
    async def open(
        cls, settings: Settings, *, plumbing: Plumbing | None = None, capabilities: tuple[str, ...] | None = None
    ) -> Runtime:
        """Open the plumbing (unless given) and load what each capability needs (default: the settings'
        PROCESSOR_CAPABILITIES)."""
        configure_pixel_limit(settings.image_search_max_pixels)
        chosen = settings.processor_capabilities if capabilities is None else capabilities
        if "callback" in chosen and not settings.callback_secrets:
            raise StartupError(
                "CALLBACK_HOSTS is set but CALLBACK_SECRET is not: callbacks are signed with it (make one with: "
                "echo whsec_$(head -c 32 /dev/urandom | base64)), or leave callback out of PROCESSOR_CAPABILITIES"
            )
        own = plumbing is None
        runtime = cls(settings, plumbing or await Plumbing.open(settings), chosen, owns_plumbing=own)
        try:
            if "index" in chosen:
                runtime.clip = await asyncio.to_thread(ClipEmbedder.load, settings)
                runtime.opened_index = await open_image_index(
                    settings, runtime.store, runtime.clip.model_id, runtime.clip.dim
                )
            if "image" in chosen:
                runtime.generator = await asyncio.to_thread(ImageGenerator.load, settings)
            if "voice" in chosen:
                runtime.voice = await asyncio.to_thread(VoiceCloner.load, settings)
            if "callback" in chosen:
                runtime.callbacks = open_client(settings)
        except BaseException:
            await runtime.close()
            raise
        log.info(
            "processor_runtime_ready",
            capabilities=list(chosen),
            storage=runtime.store.name,
            qdrant=(settings.qdrant_url or f"embedded:{settings.image_search_db_path}") if "index" in chosen else None,
        )
        return runtime

    async def readiness(self) -> Checks:
        """What this processor owns: its models, and (when it indexes) the image index."""
        checks: Checks = {}
        if "index" in self.capabilities:
            checks["clip_model"] = loaded(self.clip)
            checks["qdrant"] = await probe(self.index.ping()) if self.index is not None else "not opened"
        if "image" in self.capabilities:
            checks["image_model"] = loaded(self.generator)
        if "voice" in self.capabilities:
            checks["voice_model"] = loaded(self.voice)
        return checks

    async def close(self) -> None:
        if self.callbacks is not None:
            await self.callbacks.aclose()
        if self.opened_index is not None:
            await self.opened_index.close()
        if self.owns_plumbing:
            await self.plumbing.close()
