"""A real Apache Kafka for integration tests: session fixtures and small client helpers.

The fixtures `apache_kafka` (1 node) and `apache_kafka_cluster` (3 nodes) are re-exported by
tests/integration/conftest.py. Where Java 17 or Maven is missing they skip, unless
CAPTIONSTREAM_REQUIRE_APACHE_KAFKA=1 (CI) turns the skip into a failure: CI must never pass
by silently running none of these tests.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from captionstream.apache_kafka import ApacheKafkaCluster, ensure_kafka_jars, java_problem
from captionstream.errors import BrokerError

REQUIRE_ENV = "CAPTIONSTREAM_REQUIRE_APACHE_KAFKA"


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail where CAPTIONSTREAM_REQUIRE_APACHE_KAFKA=1 says Kafka must be there."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"Apache Kafka is required ({REQUIRE_ENV}=1) but: {reason}", pytrace=False)
    pytest.skip(f"no Apache Kafka: {reason}")


def require_apache_kafka() -> None:
    """Java 17+ and the jars (gathered with Maven on first use), or skip/fail."""
    problem = java_problem()
    if problem is not None:
        unavailable(problem)
    try:
        ensure_kafka_jars()
    except BrokerError as exc:  # e.g. Maven Central out of reach
        unavailable(exc.detail)


def running_cluster(root: Path, nodes: int, **options: Any) -> Iterator[ApacheKafkaCluster]:
    require_apache_kafka()
    with ApacheKafkaCluster(root, nodes=nodes, **options) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaCluster]:
    """One Apache Kafka node (broker + controller), shared by the session."""
    yield from running_cluster(tmp_path_factory.mktemp("apache-kafka"), nodes=1)


@pytest.fixture(scope="module")
def apache_kafka_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApacheKafkaCluster]:
    """Three Apache Kafka nodes (RF 3, min.insync.replicas 2), shared by a module: three
    JVMs would otherwise idle through the rest of the session on CI's two cores.

    A test that stops a node must start it again before it ends (`start_node`).
    """
    yield from running_cluster(tmp_path_factory.mktemp("apache-kafka-3"), nodes=3)


# --- client helpers ------------------------------------------------------------------


async def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
) -> None:
    """Create a topic and raise on a per-topic error code (aiokafka returns them, it
    does not raise them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor, topic_configs=configs or {})]
        )
    finally:
        await admin.close()
    errors = [(t[0], t[1]) for t in response.topic_errors if t[1] != 0]
    assert not errors, f"create_topics {name}: error codes {errors}"


async def describe_partitions(bootstrap: str, topic: str) -> dict[int, dict[str, Any]]:
    """Partition -> {"leader": id, "replicas": [...], "isr": [...]} from a metadata request."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {
        p["partition"]: {"leader": p["leader"], "replicas": p["replicas"], "isr": p["isr"]}
        for p in described["partitions"]
    }


async def wait_for_partitions(
    bootstrap: str, topic: str, timeout_s: float, what: str, ok: Any
) -> dict[int, dict[str, Any]]:
    """Poll `describe_partitions` until `ok(partitions)` holds; return them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            partitions = await describe_partitions(bootstrap, topic)
        except Exception:  # a node just went away: ask again
            partitions = {}
        if partitions and ok(partitions):
            return partitions
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: not {what} after {timeout_s}s: {partitions}")
        await asyncio.sleep(0.2)


async def produce(bootstrap: str, topic: str, values: list[bytes], **options: Any) -> None:
    """Send every value with acks=all and wait for each acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=value)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 30) -> list[bytes]:
    """The first `count` values of partition 0, read from the beginning without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + timeout_s
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            values += [record.value for records in batches.values() for record in records]
    finally:
        await consumer.stop()
    return values
