"""Retries, dead letters and malformed events, on a worker whose model fails on purpose.

This module runs its own broker: its worker must not share a consumer group with the
session's normal worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import websockets
from aiokafka import AIOKafkaConsumer

from captionstream.kafka import assign_whole_topic
from captionstream.schemas.topics import TOPICS, Headers
from tests.helpers.images import make_png
from tests.integration.flaky import ALWAYS_FAILS, FLAKY_ONCE
from tests.integration.stack import Gateway, Stack, own_stack, wait_until

pytestmark = pytest.mark.brokers("embedded", "apache")


@pytest.fixture(scope="module")
def flaky(
    tmp_path_factory: pytest.TempPathFactory, broker_kind: str
) -> Iterator[tuple[Stack, Gateway]]:
    with own_stack(
        tmp_path_factory.mktemp("flaky"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create",
        CAPTIONSTREAM_MAX_ATTEMPTS="3",
        CAPTIONSTREAM_RETRY_BACKOFF_S="0.2",
    ) as stack:
        stack.start_worker()
        yield stack, stack.start_gateway()


async def dead_letters(bootstrap: str, count: int, timeout_s: float = 30) -> list[object]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await assign_whole_topic(consumer, TOPICS.dead_letters.name)
        found: list[object] = []
        async with asyncio.timeout(timeout_s):
            while len(found) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(batch)
        return found
    finally:
        await consumer.stop()


async def test_transient_failure_is_retried_and_pushed_as_retry(
    flaky: tuple[Stack, Gateway],
) -> None:
    _, gateway = flaky
    job_id = gateway.upload(make_png(color=FLAKY_ONCE)).json()["job_id"]
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/{job_id}") as ws:
        pushed = [json.loads(m) async for m in ws]
    statuses = [m["status"] for m in pushed]
    assert "RETRY" in statuses, pushed
    retry = pushed[statuses.index("RETRY")]
    assert retry["attempts"] == 1
    assert "first attempt fails" in retry["error"]
    assert statuses[-1] == "SUCCESS"
    final = gateway.status(job_id).json()
    assert final["attempts"] == 2
    assert final["error"] is None
    assert final["result"]["caption"]


async def test_exhausted_retries_fail_the_job_and_dead_letter_the_event(
    flaky: tuple[Stack, Gateway],
) -> None:
    stack, gateway = flaky
    doomed = gateway.upload(make_png(color=ALWAYS_FAILS)).json()["job_id"]
    fine = gateway.upload(make_png(color=(10, 20, 30))).json()["job_id"]

    failed = gateway.wait_terminal(doomed)
    assert failed["status"] == "FAILURE"
    assert failed["attempts"] == 3
    assert "always fails" in failed["error"]
    assert "3 attempts" in failed["error"]
    assert gateway.wait_terminal(fine)["status"] == "SUCCESS"

    # Garbage on the images topic is dead-lettered too, and the worker carries on.
    producer = stack.kafka.producer()
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.images.name, b"\x00not json", key=b"garbage")
    finally:
        await producer.stop()

    records = await dead_letters(stack.bootstrap, count=2)
    by_key = {r.key: r for r in records}  # type: ignore[attr-defined]
    doomed_record = by_key[doomed.encode()]
    headers = {k: v.decode() for k, v in doomed_record.headers}
    assert headers[Headers.ATTEMPTS] == "3"
    assert "always fails" in headers[Headers.REASON]
    assert headers[Headers.SOURCE_TOPIC] == TOPICS.images.name
    assert json.loads(doomed_record.value)["job_id"] == doomed, "the original event, verbatim"
    garbage = by_key[b"garbage"]
    assert garbage.value == b"\x00not json"
    assert "malformed" in dict(garbage.headers)[Headers.REASON].decode()

    after = gateway.upload(make_png(color=(40, 50, 60))).json()["job_id"]
    assert gateway.wait_terminal(after)["status"] == "SUCCESS"
    wait_until(lambda: all(c.alive() for c in stack.components), 1, "all components alive")
