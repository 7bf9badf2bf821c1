"""Replies to waiting requesters: handed over in memory to a requester in the same process (one-process mode),
through the broker to one elsewhere; pieces and the final reply in the order they were sent, either way."""

from __future__ import annotations

import asyncio

from api.replies import ReplyListener, ReplyPiece
from contract.messages import MSGPACK, JobReply, encode
from infra.broker import Publisher, connect


def _reply(job_id: str) -> bytes:
    return encode(JobReply(job_id=job_id, status="succeeded", result={"n": 1}), MSGPACK)


async def _send_stream(publisher: Publisher, queue: str, job_id: str) -> None:
    await publisher.reply_piece(queue, job_id, 0, b"ab")
    await publisher.reply_piece(queue, job_id, 2, b"cd")
    await publisher.reply(queue, job_id, _reply(job_id), MSGPACK)


SENT_IN_ORDER = [
    ReplyPiece(0, b"ab"),
    ReplyPiece(2, b"cd"),
    JobReply(job_id="job-2", status="succeeded", result={"n": 1}),
]


async def _events(queue: asyncio.Queue, count: int) -> list[object]:
    async with asyncio.timeout(10):
        return [await queue.get() for _ in range(count)]


async def test_a_requester_in_the_same_process_gets_its_replies_in_memory_at_once(make_env, rabbit):
    connection = await connect(make_env()["AMQP_URL"])
    async with connection:
        publisher = await Publisher.open(connection)
        listener = ReplyListener(connection, publisher)
        await listener.start()
        try:
            waiting = listener.expect("job-1")
            await publisher.reply(listener.queue_name, "job-1", _reply("job-1"), MSGPACK)
            # no round trip through the broker: the reply is there when the call returns
            assert waiting.done()
            assert waiting.result().result == {"n": 1}

            stream = listener.expect_stream("job-2")
            await _send_stream(publisher, listener.queue_name, "job-2")
            assert stream.qsize() == 3
            assert await _events(stream, 3) == SENT_IN_ORDER
        finally:
            await listener.close()
        # once closed, its replies go to the broker again (where its queue is gone): nothing breaks
        await publisher.reply(listener.queue_name, "job-3", _reply("job-3"), MSGPACK)


async def test_a_requester_in_another_process_gets_its_replies_through_the_broker(make_env, rabbit):
    url = make_env()["AMQP_URL"]
    processor_side, api_side = await connect(url), await connect(url)
    async with processor_side, api_side:
        publisher = await Publisher.open(processor_side)
        listener = ReplyListener(api_side, await Publisher.open(api_side))
        await listener.start()
        try:
            waiting = listener.expect("job-1")
            await publisher.reply(listener.queue_name, "job-1", _reply("job-1"), MSGPACK)
            async with asyncio.timeout(10):
                assert (await waiting).result == {"n": 1}

            stream = listener.expect_stream("job-2")
            await _send_stream(publisher, listener.queue_name, "job-2")
            assert await _events(stream, 3) == SENT_IN_ORDER
        finally:
            await listener.close()
