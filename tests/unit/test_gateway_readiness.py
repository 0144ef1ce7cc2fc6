"""Readiness checks that need no broker: an unreachable Kafka and a stopped view follower
are reported as failing checks (the happy path runs on a real broker in
tests/integration/test_gateway_api.py)."""

from __future__ import annotations

from aiokafka import AIOKafkaClient

from captionstream.broker import free_port
from captionstream.gateway.readiness import Readiness
from captionstream.gateway.view import JobStateFollower, JobView
from captionstream.kafka import KafkaConnection
from captionstream.settings import KafkaProfile


async def test_unreachable_broker_and_stopped_follower_are_not_ready() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    view = JobView()
    kafka = KafkaConnection(bootstrap, KafkaProfile.EMBEDDED)
    follower = JobStateFollower(view, kafka, "captionstream.job-state.v1")
    readiness = Readiness(client, follower, timeout_s=1.0)
    try:
        broker, job_view = await readiness.checks()
    finally:
        await client.close()
        await follower.consumer.stop()
    assert (broker.name, broker.ok) == ("broker", False)
    assert "unreachable" in broker.detail
    assert (job_view.name, job_view.ok) == ("job_view", False)
    assert "not running" in job_view.detail
