"""The broker topology: a queue per capability, unknown routing keys dead-lettered, a retry waiting in its delay's
queue alone, and the move from the single queue and the retry bindings of earlier versions."""

from __future__ import annotations

import aio_pika

from contract.bucket_events import BUCKET_EVENT
from contract.messages import JOB_TYPES
from infra.broker import (
    CAPABILITY_QUEUES,
    DEAD_QUEUE,
    JOBS_EXCHANGE,
    LEGACY_JOBS_QUEUE,
    LEGACY_RETRY_DELAY_HEADER,
    RETRY_DELAY_HEADER,
    RETRY_DELAYS_SECONDS,
    RETRY_EXCHANGE,
    UNROUTED_QUEUE,
    capability_of,
    declare_topology,
    retry_queue_arguments,
    retry_queue_name,
)


def test_every_job_type_is_routed_to_exactly_one_capability():
    for job_type in [*JOB_TYPES, BUCKET_EVENT]:
        owners = [name for name, (_, keys) in CAPABILITY_QUEUES.items() if job_type in keys]
        assert len(owners) == 1, (job_type, owners)
        assert capability_of(job_type) == owners[0]
    routed = {key for _, keys in CAPABILITY_QUEUES.values() for key in keys}
    assert routed == {*JOB_TYPES, BUCKET_EVENT}


async def _declare_legacy_topology(url: str) -> None:
    """What earlier versions declared: the ams.jobs exchange with one queue, also named ams.jobs, bound to "#"."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            LEGACY_JOBS_QUEUE, durable=True, arguments={"x-max-priority": 9, "x-dead-letter-exchange": "ams.dead"}
        )
        await queue.bind(exchange, routing_key="#")


async def test_messages_waiting_in_the_legacy_queue_move_to_their_capability_queues(make_env, rabbit):
    env = make_env()
    url, vhost = env["AMQP_URL"], env["VHOST"]
    await _declare_legacy_topology(url)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        sent = {"image.index": 30, "image.generate": 7, "voice.generate": 5, "image.delete": 3, "bucket.event": 2}
        for routing_key, count in sent.items():
            for n in range(count):
                await exchange.publish(
                    aio_pika.Message(b"{}", message_id=f"{routing_key}-{n}", priority=n % 10), routing_key=routing_key
                )
    assert rabbit.queue_counts(vhost)[LEGACY_JOBS_QUEUE] == (47, 0)

    connection = await aio_pika.connect(url)
    async with connection:
        await declare_topology(connection)
        await declare_topology(connection)  # idempotent, and the move happens once
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"{}", message_id="typo"), routing_key="image.indx")
        await exchange.publish(aio_pika.Message(b"{}", message_id="new"), routing_key="image.index")

    counts = rabbit.queue_counts(vhost)
    assert LEGACY_JOBS_QUEUE not in counts
    assert counts["ams.index"] == (30 + 3 + 2 + 1, 0)
    assert counts["ams.image"] == (7, 0)
    assert counts["ams.voice"] == (5, 0)
    assert counts[UNROUTED_QUEUE] == (1, 0)  # the unknown routing key, through the alternate exchange
    assert counts[DEAD_QUEUE] == (0, 0)

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("ams.image")
        ids = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id)
        assert sorted(ids) == sorted(f"image.generate-{n}" for n in range(7))


async def test_a_retry_waits_in_its_delay_queue_alone_and_the_earlier_bindings_are_removed(make_env, rabbit):
    """A headers exchange leaves binding arguments named x-... out of the match: the bindings by x-ams-retry-delay
    of earlier versions (made by the product, and by the definitions file) matched every copy, so each retry went
    to all four delay queues and came back four times. declare_topology removes them."""
    env = make_env()
    url, vhost = env["AMQP_URL"], env["VHOST"]
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True)
        for delay in RETRY_DELAYS_SECONDS:
            queue = await channel.declare_queue(
                retry_queue_name(delay), durable=True, arguments=retry_queue_arguments(delay)
            )
            for routing_key in ("", queue.name):
                arguments = {"x-match": "all", LEGACY_RETRY_DELAY_HEADER: str(delay)}
                await queue.bind(exchange, routing_key=routing_key, arguments=arguments)
        await declare_topology(connection)
        await declare_topology(connection)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RETRY_EXCHANGE)
        headers = {RETRY_DELAY_HEADER: "30", LEGACY_RETRY_DELAY_HEADER: "1"}  # a second retry of an older copy
        await exchange.publish(aio_pika.Message(b"{}", message_id="m", headers=headers), routing_key="image.generate")
    counts = rabbit.queue_counts(vhost)
    assert counts[retry_queue_name(30)] == (1, 0)
    assert counts[retry_queue_name(5)] == counts[retry_queue_name(120)] == (0, 0)
    assert counts[retry_queue_name(1)] == counts["ams.image"] == (0, 0)  # not there, and not already expired from it
