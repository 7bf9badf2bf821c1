"""image.embed: embed one image with the index's CLIP model and reply with its vector (request/reply; nothing is
stored). An API process that holds only the CLIP text tower sends its search-by-image queries here."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from contract.imaging import InvalidImageError, decode_image
from contract.messages import IMAGE_EMBED, ImageEmbedV1
from models.clip import ClipEmbedder
from processor.handlers.base import Job
from processor.outcomes import Failed, Outcome, Succeeded


class ImageEmbedHandler:
    message_type = IMAGE_EMBED
    always_record = False
    pipelined = False
    apart = False

    def __init__(self, *, embedder: ClipEmbedder, batch_size: int, max_pixels: int) -> None:
        self._embedder = embedder
        self.batch_size = batch_size
        self._max_pixels = max_pixels

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        images, positions = [], []
        for position, job in enumerate(jobs):
            payload: ImageEmbedV1 = job.payload
            try:
                decoded = await asyncio.to_thread(decode_image, payload.data, self._max_pixels)
            except InvalidImageError as exc:
                outcomes[position] = Failed(exc.code, exc.message)
                continue
            images.append(decoded.image)
            positions.append(position)
        if images:
            vectors = await asyncio.to_thread(self._embedder.embed_images, images)
            for position, vector in zip(positions, vectors, strict=True):
                outcomes[position] = Succeeded(
                    {"model": self._embedder.model_id, "dim": int(vector.shape[0])},
                    attachment=np.asarray(vector, dtype="<f4").tobytes(),
                )
        return [outcome for outcome in outcomes if outcome is not None]
