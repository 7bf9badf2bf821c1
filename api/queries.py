"""Search queries as vectors. Text goes through the CLIP text tower in this process. An example image goes through
the image tower where this process has one (the one-process mode shares the processor's model); an API-only
process holds the text tower alone and asks an indexing processor over the broker (an image.embed request)."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from api.errors import RETRY_AFTER_SECONDS, ApiError
from api.replies import ReplyListener
from contract.messages import IMAGE_EMBED, MSGPACK, ImageEmbedV1, encode
from infra.broker import Priority, Publisher, consumers_of
from models.clip import ClipEmbedder


class QueryEncoder:
    def __init__(
        self, clip: ClipEmbedder, publisher: Publisher, replies: ReplyListener, timeout_seconds: float
    ) -> None:
        self._clip = clip
        self._publisher = publisher
        self._replies = replies
        self._timeout = timeout_seconds
        self.model_id = clip.model_id
        self.dim = clip.dim

    @property
    def image_tower(self) -> bool:
        """Whether example images are embedded in this process (else by an indexing processor)."""
        return self._clip.image_tower

    async def text(self, query: str) -> list[float]:
        return (await asyncio.to_thread(self._clip.embed_texts, [query]))[0].tolist()

    async def image(self, data: bytes, image: object) -> list[float]:
        """The vector of an example image: `image` (already decoded) here, or `data` sent to a processor."""
        if self._clip.image_tower:
            return (await asyncio.to_thread(self._clip.embed_images, [image]))[0].tolist()
        return await self._remote(data)

    async def _remote(self, data: bytes) -> list[float]:
        if not await consumers_of(self._publisher.connection, "index"):
            raise ApiError(
                503,
                "index_unavailable",
                "no indexing processor is running to embed the example image (start one with the index "
                "capability: PROCESSOR_CAPABILITIES); retry shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        request_id = str(uuid.uuid4())
        future = self._replies.expect(request_id)
        try:
            await self._publisher.publish(
                message_type=IMAGE_EMBED,
                body=encode(ImageEmbedV1(data=data), MSGPACK),
                message_id=request_id,
                content_type=MSGPACK,
                priority=Priority.INTERACTIVE,
                reply_to=self._replies.queue_name,
                correlation_id=request_id,
            )
        except BaseException:
            self._replies.forget(request_id)
            raise
        reply = await self._replies.wait(request_id, future, self._timeout)
        if reply is None:
            raise ApiError(
                503,
                "index_unavailable",
                f"no indexing processor embedded the example image within {self._timeout:g} s "
                "(is a processor with the index capability running?); retry shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if reply.status != "succeeded" or reply.attachment is None:
            error = reply.error
            raise ApiError(422, error.code if error else "embedding_failed", error.message if error else "failed")
        vector = np.frombuffer(reply.attachment, dtype="<f4")
        if vector.shape[0] != self.dim:
            raise ApiError(
                503,
                "index_unavailable",
                f"the indexing processor answered with a {vector.shape[0]}-dimensional vector, this API expects "
                f"{self.dim} ({self.model_id}): check CLIP_MODEL is the same everywhere",
            )
        return vector.tolist()
