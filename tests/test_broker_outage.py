"""RabbitMQ stopped and started again under the running server (its own broker node, so the session's node is not
disturbed): writes answer 503 broker_unavailable with Retry-After, nothing half-written is left, an
Idempotency-Key first tried during the outage works afterwards, /metrics keeps answering, the server recovers on its
own, and every job accepted just before the outage (some of them in the processor's hands when the broker stops)
completes, once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterator

import aio_pika
import httpx
import pytest

from contract.jobs import JOBS_PREFIX
from contract.messages import IMAGE_GENERATE
from contract.metrics import REGISTRY
from infra.broker import EVENTS_EXCHANGE, PUBLISH_TIMEOUT_SECONDS
from infra.settings import Settings
from processor.announcer import OWED_PREFIX
from tests.support.amqp import next_reply, wait_until
from tests.support.images import encoded
from tests.support.rabbitmq import RabbitNode
from tests.support.server import running_server


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("outage-rabbitmq"))
    node.start()
    yield node
    node.stop()


async def _jobs(server) -> list[str]:
    return [info.key async for info in server.services.store.list(JOBS_PREFIX)]


async def test_writes_during_a_broker_outage_get_503_and_leave_nothing(make_env, own_broker):
    env = {**make_env(IMAGE_ENABLED="1"), "AMQP_URL": own_broker.add_vhost("outage")}
    async with running_server(Settings.from_env(env)) as server:
        client = server.client
        warm = await client.post("/v1/images/generate", json={"prompt": "before", "seed": 1})
        assert warm.status_code == 200
        # light load just before the outage: generations and uploads that are queued or running when it starts
        accepted = [
            await client.post("/v1/jobs", json={"type": "image.generate", "params": {"prompt": f"load {n}", "seed": n}})
            for n in range(6)
        ] + [
            await client.post("/v1/images?wait=false", files={"file": (f"{n}.png", encoded(10 + n), "image/png")})
            for n in range(3)
        ]
        assert [response.status_code for response in accepted] == [202] * len(accepted)
        records_before = await _jobs(server)

        own_broker.ctl("stop_app")
        try:

            async def broker_down() -> bool:
                return (await client.get("/readyz")).json()["checks"]["broker"] != "ok"

            await wait_until(broker_down, timeout=30)
            key = {"Idempotency-Key": "tried-during-the-outage"}
            writes = [
                await client.post("/v1/jobs", json={"type": "image.generate", "params": {"prompt": "x"}}, headers=key),
                await client.post("/v1/images/generate", json={"prompt": "during"}),
                await client.post("/v1/images", files={"file": ("a.png", encoded(1), "image/png")}),
                await client.post("/v1/images?wait=false", files={"file": ("b.png", encoded(2), "image/png")}),
            ]
            for response in writes:
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "broker_unavailable"
                assert int(response.headers["Retry-After"]) > 0
            assert await _jobs(server) == records_before, "no record left behind"
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert "ams_broker_reachable 0.0" in metrics.text
            assert "ams_queue_messages{" not in metrics.text
        finally:
            own_broker.ctl("start_app")

        async def recovered() -> bool:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        try:
            await wait_until(recovered, timeout=60, interval=0.5)
        except AssertionError:
            raise AssertionError((await client.get("/readyz")).text) from None
        retried = await client.post("/v1/jobs", json={"type": "image.generate", "params": {"prompt": "x"}}, headers=key)
        assert retried.status_code == 202, retried.text

        async def done() -> bool:
            job = (await client.get(retried.json()["status_url"])).json()
            return job["status"] == "succeeded"

        await wait_until(done, timeout=60)

        async def all_accepted_done() -> bool:
            states = [(await client.get(response.json()["status_url"])).json()["status"] for response in accepted]
            assert "failed" not in states, states
            return set(states) == {"succeeded"}

        await wait_until(all_accepted_done, timeout=90, interval=0.5)
        assert await server.services.index.count() == 3, "each upload indexed once"
        assert (await client.post("/v1/images/generate", json={"prompt": "after", "seed": 2})).status_code == 200
        assert "ams_broker_reachable 1.0" in (await client.get("/metrics")).text


async def test_a_broker_blocking_publishers_gets_503_and_the_job_never_runs(make_env, own_broker):
    """A disk or memory alarm: RabbitMQ blocks a publishing connection until it clears. The first write to meet it
    gets 503 broker_unavailable with Retry-After, the message saying RabbitMQ blocked the connection, and its job
    is withdrawn at once: the record says so. /readyz says blocked,
    and the next writes get 503 at once, leaving nothing; jobs queued before the alarm finish and are acknowledged
    meanwhile (consuming has a connection of its own), their events owed in the store and published once the alarm
    clears. The first message, already written to the blocked
    connection, reaches its queue when the alarm clears; the processor acknowledges it without running the job
    (nothing made, nothing dead-lettered), and its Idempotency-Key starts it afresh."""
    env = {**make_env(IMAGE_ENABLED="1"), "AMQP_URL": own_broker.add_vhost("alarm")}
    withdrawn_label = {"type": IMAGE_GENERATE, "outcome": "withdrawn"}
    async with running_server(Settings.from_env(env)) as server:
        client = server.client
        assert (await client.post("/v1/images/generate", json={"prompt": "before", "seed": 1})).status_code == 200
        records_before = set(await _jobs(server))
        withdrawn_before = REGISTRY.get_sample_value("ams_jobs_total", withdrawn_label) or 0
        key = {"Idempotency-Key": "tried-during-the-alarm"}
        body = {"type": IMAGE_GENERATE, "params": {"prompt": "during", "seed": 2}}
        # slow enough that none finishes (and publishes its event, which would meet the alarm first) while
        # rabbitmqctl sets the alarm
        slow = {"prompt": "slow", "width": 256, "height": 256, "steps": 4}
        queued = [
            (await client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {**slow, "seed": n}})).json()
            for n in range(4)
        ]
        records_before |= {f"{JOBS_PREFIX}{job['job_id']}.json" for job in queued}
        subscriber = await aio_pika.connect(env["AMQP_URL"])  # consumes only: RabbitMQ does not block it
        events = await (await subscriber.channel()).declare_queue(exclusive=True)
        await events.bind(EVENTS_EXCHANGE, routing_key="#")

        async def statuses() -> list[str]:
            return [(await client.get(job["status_url"])).json()["status"] for job in queued]

        await asyncio.to_thread(own_broker.ctl, "set_disk_free_limit", "100000GB")
        try:

            async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
                started = asyncio.get_running_loop().time()
                response = await request
                return response, asyncio.get_running_loop().time() - started

            refusing = asyncio.create_task(timed(client.post("/v1/jobs", json=body, headers=key)))
            await asyncio.sleep(0.5)  # the publish has met the alarm: RabbitMQ no longer reads that connection
            assert (await statuses()).count("succeeded") < len(queued), "the jobs finished early; make them slower"

            # the consumers have a connection of their own: the jobs finish and are acknowledged meanwhile
            async def all_acknowledged() -> bool:
                return own_broker.queue_counts("alarm")["ams.image"] == (0, 0)

            await wait_until(all_acknowledged, timeout=60, interval=0.5)
            assert set(await statuses()) == {"succeeded"}
            owed = [info.key async for info in server.services.store.list(OWED_PREFIX)]
            # the events of the jobs finished during the alarm wait in the store while RabbitMQ blocks publishers
            assert 1 <= len(owed) <= len(queued), owed
            refused, seconds = await refusing
            # the publish gave up as soon as RabbitMQ said it blocked the connection, not at the confirm's timeout
            assert seconds < PUBLISH_TIMEOUT_SECONDS / 2
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "broker_unavailable"
            assert "blocked the connection" in refused.json()["message"]
            assert "alarm" in refused.json()["message"]
            assert int(refused.headers["Retry-After"]) > 0
            (record,) = set(await _jobs(server)) - records_before
            job_id = record.removeprefix(JOBS_PREFIX).removesuffix(".json")
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert (job["status"], job["error"]["code"]) == ("failed", "withdrawn"), job

            readiness = await client.get("/readyz")
            assert (readiness.status_code, readiness.json()["checks"]["broker"]) == (503, "blocked")
            started = asyncio.get_running_loop().time()
            at_once = await client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {"prompt": "blocked"}})
            assert asyncio.get_running_loop().time() - started < 2
            assert at_once.status_code == 503, at_once.text
            assert "blocking publishers" in at_once.json()["message"]
            assert set(await _jobs(server)) - records_before == {record}, "nothing left of a publish never sent"
            # nor is a reply written to it: 16 MB would fill the socket that RabbitMQ no longer reads, and wait there
            large = bytes(16 << 20)
            await asyncio.wait_for(server.services.publisher.reply("nobody", job_id, large, "image/png"), timeout=5)
        finally:
            await asyncio.to_thread(own_broker.ctl, "set_disk_free_limit", "50MB")

        def withdrawn_settled() -> bool:
            return (REGISTRY.get_sample_value("ams_jobs_total", withdrawn_label) or 0) - withdrawn_before == 1

        await wait_until(withdrawn_settled, timeout=30)
        announced = set()
        while len(announced) < len(queued):
            message = await next_reply(events, 10)
            assert message is not None, "the owed events were not published once the alarm cleared"
            announced.add(json.loads(message.body)["job_id"])
        assert announced == {job["job_id"] for job in queued}  # the withdrawn job is not announced
        await subscriber.close()
        assert [info.key async for info in server.services.store.list(OWED_PREFIX)] == []
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["error"]["code"] == "withdrawn"
        assert not await server.services.store.exists(f"images/generated/{job_id}.png")
        assert own_broker.queue_counts("alarm")["ams.dead"] == (0, 0)
        assert (await client.get("/readyz")).json()["checks"]["broker"] == "ok"

        retried = await client.post("/v1/jobs", json=body, headers=key)
        assert retried.status_code == 202, retried.text
        assert retried.json()["job_id"] == job_id

        async def done() -> bool:
            return (await client.get(retried.json()["status_url"])).json()["status"] == "succeeded"

        await wait_until(done, timeout=30)
