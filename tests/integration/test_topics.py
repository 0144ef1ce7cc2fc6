"""Topics are created from the plan and checked, on a real Apache Kafka: per-topic
errors name the topic and the cause; an existing topic that differs stops start-up; and
`captionstream topics --create` makes them for an administrator."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from captionstream.apache_kafka import ApacheKafkaCluster
from captionstream.errors import BrokerError, TopicMismatch
from captionstream.kafka import KafkaConnection, PlannedTopic, ensure_topics, topic_plan
from captionstream.settings import KafkaProfile
from tests.integration.apache import create_topic


def kafka(cluster: ApacheKafkaCluster) -> KafkaConnection:
    return KafkaConnection(cluster.bootstrap, KafkaProfile.KAFKA)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def test_created_topics_get_the_planned_layout_and_a_second_run_creates_nothing(
    apache_kafka: ApacheKafkaCluster,
) -> None:
    plan = [
        PlannedTopic(unique("state"), 3, {"cleanup.policy": "compact"}),
        PlannedTopic(unique("events"), 2),
    ]
    created = await ensure_topics(kafka(apache_kafka), plan)
    assert created == [t.name for t in plan]
    assert await ensure_topics(kafka(apache_kafka), plan) == []


async def test_a_topic_kafka_refuses_is_named_with_the_cause(
    apache_kafka: ApacheKafkaCluster,
) -> None:
    name = unique("replicated")
    with pytest.raises(BrokerError) as refused:
        # Three replicas on a one-node cluster: aiokafka returns the error, raises none.
        await ensure_topics(kafka(apache_kafka), [PlannedTopic(name, 1)], replication_factor=3)
    assert name in refused.value.detail
    assert "InvalidReplicationFactor" in refused.value.detail
    assert "captionstream topics --create" in refused.value.detail


async def test_an_existing_topic_that_differs_stops_start_up(
    apache_kafka: ApacheKafkaCluster,
) -> None:
    name = unique("job-state")
    await create_topic(apache_kafka.bootstrap, name, partitions=2)  # not compacted
    with pytest.raises(TopicMismatch) as mismatch:
        await ensure_topics(
            kafka(apache_kafka), [PlannedTopic(name, 4, {"cleanup.policy": "compact"})]
        )
    assert f"topic {name} has 2 partitions, the plan 4" in mismatch.value.detail
    assert f"topic {name} has cleanup.policy=delete, the plan compact" in mismatch.value.detail


async def test_components_without_create_rights_find_missing_topics_named(
    apache_kafka: ApacheKafkaCluster,
) -> None:
    name = unique("absent")
    with pytest.raises(BrokerError, match=f"missing topics: {name}"):
        await ensure_topics(kafka(apache_kafka), [PlannedTopic(name, 1)], create=False)


def test_topics_command_prints_the_plan_and_creates_it(apache_kafka: ApacheKafkaCluster) -> None:
    group = unique("proc")
    env = {
        **os.environ,
        "CAPTIONSTREAM_KAFKA_BOOTSTRAP": apache_kafka.bootstrap,
        "CAPTIONSTREAM_GROUP_ID": group,
        "CAPTIONSTREAM_PARTITIONS": "4",
    }
    run = subprocess.run(
        [sys.executable, "-m", "captionstream", "topics", "--create"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for topic in topic_plan(4, group):
        assert topic.name in run.stdout
    assert f"GROUP {group}: READ" in run.stdout
    assert "every topic of the plan exists as planned" in run.stderr
