"""Pins the aiokafka internals `captionstream.kafka.compat` uses: an upgrade that moves
them fails here, with the reason, rather than at run time."""

from __future__ import annotations

import inspect

from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient


async def test_a_consumer_keeps_its_client_with_the_methods_compat_calls() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    try:
        assert isinstance(consumer._client, AIOKafkaClient)
    finally:
        await consumer._client.close()
    assert inspect.iscoroutinefunction(AIOKafkaClient.close)
    # add_topic returns an awaitable that resolves once metadata has been refreshed.
    assert "topic" in inspect.signature(AIOKafkaClient.add_topic).parameters
