"""captionstream.apache_kafka against itself: real Apache Kafka JVMs, driven with aiokafka.

One node: records produced with acks=all survive a stop and a start on the same root, and
a stop leaves no JVM behind. Three nodes: with min.insync.replicas=2 a SIGKILLed partition
leader costs acks=all producers a few seconds, and the node rejoins the ISR when started
again.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from captionstream import apache_kafka
from captionstream.apache_kafka import ApacheKafkaCluster, ensure_kafka_jars, java_problem
from captionstream.errors import BrokerError
from tests.integration.apache import (
    create_topic,
    produce,
    read_all,
    require_apache_kafka,
    wait_for_partitions,
)

RECORDS = 20
# broker.session.timeout.ms is 3 s; allow for three busy JVMs on two shared cores
LEADER_MOVE_BOUND_S = 20.0
REJOIN_BOUND_S = 45.0


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (a cluster root is in every JVM's)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited while we looked
            continue
    return pids


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def values(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(count)]


def group_member(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="launcher-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )


async def consume_and_commit(bootstrap: str, topic: str, count: int) -> None:
    consumer = group_member(bootstrap, topic)
    await consumer.start()
    try:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            seen += sum(len(records) for records in batches.values())
        assert seen == count
        await consumer.commit()
    finally:
        await consumer.stop()


async def committed_offset(bootstrap: str, topic: str) -> int | None:
    consumer = group_member(bootstrap, topic)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await consumer.stop()


async def test_one_node_keeps_records_and_offsets_across_restart(tmp_path: Path) -> None:
    """Also: group offsets work at all, so __consumer_offsets got RF 1 on one node."""
    require_apache_kafka()
    root = tmp_path / "kafka"
    topic = "launcher.durable"
    cluster = ApacheKafkaCluster(root, nodes=1).start()
    try:
        bootstrap = cluster.bootstrap
        first_pids = list(cluster.pids.values())
        await create_topic(bootstrap, topic)
        await produce(bootstrap, topic, values("a", RECORDS))
        await consume_and_commit(bootstrap, topic, RECORDS)
    finally:
        cluster.stop()

    assert cluster.pids == {}
    for pid in first_pids:
        assert not running(pid), f"Kafka JVM {pid} outlived stop()"
    assert processes_mentioning(str(root)) == []

    again = ApacheKafkaCluster(root, nodes=1).start()
    try:
        assert again.bootstrap == bootstrap  # same ports, from root/cluster.json
        assert again.cluster_id == cluster.cluster_id
        assert await read_all(bootstrap, topic, RECORDS) == values("a", RECORDS)
        assert await committed_offset(bootstrap, topic) == RECORDS
    finally:
        again.stop()
    assert processes_mentioning(str(root)) == []


async def test_three_nodes_survive_a_sigkilled_leader(
    apache_kafka_cluster: ApacheKafkaCluster,
) -> None:
    cluster = apache_kafka_cluster
    topic = "launcher.replicated"
    await create_topic(cluster.bootstrap, topic, replication_factor=3)
    partitions = await wait_for_partitions(
        cluster.bootstrap, topic, 30, "fully in sync", lambda ps: len(ps[0]["isr"]) == 3
    )
    await produce(cluster.bootstrap, topic, values("before", RECORDS))
    leader = partitions[0]["leader"]
    killed_at = time.monotonic()
    cluster.stop_node(leader, sig=signal.SIGKILL)
    try:
        # acks=all with min.insync.replicas=2: waits out the fencing of the dead leader,
        # then succeeds on the two nodes left.
        await produce(cluster.bootstrap, topic, values("after", RECORDS), request_timeout_ms=30000)
        acked_s = time.monotonic() - killed_at
        moved = await wait_for_partitions(
            cluster.bootstrap,
            topic,
            LEADER_MOVE_BOUND_S,
            "led by a live node",
            lambda ps: ps[0]["leader"] not in (leader, -1),
        )
        moved_s = time.monotonic() - killed_at
        assert sorted(moved[0]["isr"]) == sorted(set(cluster.node_ids) - {leader})
        print(f"SIGKILLed leader {leader}: acks=all acked {acked_s:.1f}s, moved {moved_s:.1f}s")
        assert moved_s < LEADER_MOVE_BOUND_S
    finally:
        restarted_at = time.monotonic()
        cluster.start_node(leader)
    await wait_for_partitions(
        cluster.bootstrap, topic, REJOIN_BOUND_S, "back to ISR 3", lambda ps: len(ps[0]["isr"]) == 3
    )
    print(f"node {leader} back in the ISR {time.monotonic() - restarted_at:.1f}s after start")
    expected = values("before", RECORDS) + values("after", RECORDS)
    assert await read_all(cluster.bootstrap, topic, 2 * RECORDS) == expected


def test_maven_failure_is_a_broker_error_with_mavens_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No half-gathered folder is left, and the error shows what Maven said."""
    if java_problem(tmp_path / "libs") is not None:
        pytest.skip(java_problem(tmp_path / "libs") or "")
    broken = tmp_path / "broken.pom.xml"
    broken.write_text("<project><modelVersion>4.0.0</modelVersion></project>\n")
    monkeypatch.setattr(apache_kafka, "POM_PATH", broken)
    with pytest.raises(BrokerError, match=r"Maven failed \(1\)[\s\S]*groupId"):
        ensure_kafka_jars(tmp_path / "libs")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".libs.lock", "broken.pom.xml"]


def test_java_problem_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn
    problem = java_problem(tmp_path / "libs")
    assert problem is not None
    assert "no `java`" in problem

    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\"' >&2\n")
    fake_java.chmod(0o755)
    assert "is Java 11" in (java_problem(tmp_path / "libs") or "")

    fake_java.write_text("#!/bin/sh\necho 'openjdk version \"17.0.15\"' >&2\n")
    assert "no `mvn`" in (java_problem(tmp_path / "libs") or "")

    # jars gathered from the POM as it is now: Maven is not needed any more
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / apache_kafka.STAMP_FILE).write_text(apache_kafka.pom_digest())
    assert java_problem(libs) is None
