"""Every topic the system uses, declared once, created and verified explicitly.

The plan holds the project's own topics (`schemas.topics`) and the ones Faust would
otherwise create on its own (each table's changelog and the assignor's leader topic), so
that an administrator can create all of them beforehand (`captionstream topics --create`)
and the components run without the right to create topics. Faust is told not to declare
topics (processor/app.py), so nothing is created behind this plan's back.

Creation checks the error of every topic in the broker's answer (aiokafka returns them,
it does not raise them), and an existing topic whose partition count or cleanup policy
differs from the plan stops start-up with a message naming it: a job-state topic without
compaction grows forever, and an images topic with other partitions than the job table's
changelog breaks the table's co-partitioning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from captionstream.errors import BrokerError, TopicMismatch
from captionstream.kafka.connection import KafkaConnection
from captionstream.kafka.diagnose import unreachable
from captionstream.schemas.topics import TOPICS, TopicSpec
from captionstream.settings import KafkaProfile

log = logging.getLogger(__name__)

# The processor's Faust tables (processor/app.py); each has a compacted changelog.
PROCESSOR_TABLES = ("jobs", "cancelled")


@dataclass(frozen=True, slots=True)
class PlannedTopic:
    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)
    purpose: str = ""

    @property
    def cleanup_policy(self) -> str:
        return self.config.get("cleanup.policy", "delete")


def topic_config(spec: TopicSpec) -> dict[str, str]:
    config = {"cleanup.policy": "compact"} if spec.compacted else {}
    if spec.retention_ms is not None:
        config["retention.ms"] = str(spec.retention_ms)
    return config


def changelog_topic(group_id: str, table: str) -> str:
    """Faust's name for a table's changelog (`{app id}-{table}-changelog`)."""
    return f"{group_id}-{table}-changelog"


def leader_topic(group_id: str) -> str:
    """Faust's leader-election topic (`{app id}-__assignor-__leader`)."""
    return f"{group_id}-__assignor-__leader"


def own_topics(partitions: int) -> tuple[PlannedTopic, ...]:
    """The project's own topics (what the gateway and bulk ingest use)."""
    return tuple(
        PlannedTopic(spec.name, partitions, topic_config(spec), "captionstream")
        for spec in TOPICS.all()
    )


def processor_topics(partitions: int, processor_group_id: str) -> tuple[PlannedTopic, ...]:
    """The topics Faust uses for the processor's tables and leader election."""
    changelogs = (
        PlannedTopic(
            changelog_topic(processor_group_id, table),
            partitions,  # co-partitioned with the images topic: same key, same partition
            {"cleanup.policy": "compact"},
            f"changelog of the processor's {table!r} table",
        )
        for table in PROCESSOR_TABLES
    )
    leader = PlannedTopic(
        leader_topic(processor_group_id), 1, {}, "the processor's leader election"
    )
    return (*changelogs, leader)


def topic_plan(partitions: int, processor_group_id: str) -> tuple[PlannedTopic, ...]:
    """Every topic, with the partitions and configuration it must have."""
    return own_topics(partitions) + processor_topics(partitions, processor_group_id)


async def _replication_factor(
    admin: AIOKafkaAdminClient, requested: int | None, profile: KafkaProfile
) -> int:
    """The replication factor for new topics: the setting, else the broker's
    `default.replication.factor` (aiokafka's CreateTopics is too old to ask the broker
    to apply it by itself)."""
    if requested is not None:
        return requested
    if profile is KafkaProfile.EMBEDDED:
        return 1  # one broker
    cluster = await admin.describe_cluster()
    broker_id = cluster["brokers"][0]["node_id"]
    found = await _configs(admin, ConfigResourceType.BROKER, [str(broker_id)])
    value = found.get(str(broker_id), {}).get("default.replication.factor")
    if value is None:
        raise BrokerError(
            "cannot read the brokers' default.replication.factor; set "
            "CAPTIONSTREAM_REPLICATION_FACTOR"
        )
    return int(value)


async def _configs(
    admin: AIOKafkaAdminClient, kind: ConfigResourceType, names: Iterable[str]
) -> dict[str, dict[str, str]]:
    """name -> {config: value} of each resource (resources the broker refused are left
    out)."""
    resources = [ConfigResource(kind, name) for name in names]
    if not resources:
        return {}
    found: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for error_code, _message, _type, name, entries, *_ in response.resources:
            if error_code == 0:
                found[name] = {entry[0]: entry[1] for entry in entries}
    return found


def _describe(code: int, message: str | None) -> str:
    error = for_code(code)
    return f"{error.__name__}: {message or error.description}"


def check_existing(
    plan: Iterable[PlannedTopic],
    partitions: Mapping[str, int],
    configs: Mapping[str, Mapping[str, str]],
) -> list[str]:
    """What differs between the plan and existing topics (`partitions` and `configs` by
    topic name; a topic missing from `configs` is not checked for its policy)."""
    problems = []
    for topic in plan:
        count = partitions.get(topic.name)
        if count is None:
            continue
        if count != topic.partitions:
            problems.append(
                f"topic {topic.name} has {count} partitions, the plan {topic.partitions} "
                "(CAPTIONSTREAM_PARTITIONS must match the existing topics)"
            )
        policy = configs.get(topic.name, {}).get("cleanup.policy")
        if policy is not None and set(policy.split(",")) != set(topic.cleanup_policy.split(",")):
            problems.append(
                f"topic {topic.name} has cleanup.policy={policy}, the plan {topic.cleanup_policy}"
            )
    return problems


async def ensure_topics(
    connection: KafkaConnection,
    plan: Iterable[PlannedTopic],
    *,
    replication_factor: int | None = None,
    create: bool = True,
    timeout_s: float = 30,
) -> list[str]:
    """Create the planned topics that are missing (unless `create` is false), then check
    that every planned topic exists as planned; return the names created.

    Raises `BrokerError` when Kafka cannot be reached or refuses to create a topic (with
    the topic and the broker's reason), `TopicMismatch` when an existing topic differs.
    """
    plan = tuple(plan)
    admin = connection.admin()
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        await admin.close()
        raise await unreachable(connection, exc) from exc
    try:
        described = await _partition_counts(admin, [t.name for t in plan])
        missing = [t for t in plan if t.name not in described]
        created: list[str] = []
        if missing and not create:
            raise BrokerError(
                "missing topics: "
                + ", ".join(t.name for t in missing)
                + "; create them with `captionstream topics --create`"
            )
        if missing:
            try:
                rf = await _replication_factor(admin, replication_factor, connection.profile)
            except BrokerError as exc:
                raise BrokerError(
                    f"topics not found: {', '.join(t.name for t in missing)} (missing, or "
                    "hidden from this principal: it needs DESCRIBE on them); creating them "
                    f"failed: {exc.detail}. An administrator creates the topics and grants "
                    "the ACLs with `captionstream topics --create --grant ...`"
                ) from exc
            created = await _create(admin, missing, rf)
            described = await _until_visible(admin, [t.name for t in plan], timeout_s)
        configs = await _topic_configs(admin, connection.profile, [t.name for t in plan])
        problems = check_existing(plan, described, configs)
        if problems:
            raise TopicMismatch("; ".join(problems))
        return created
    finally:
        await admin.close()


async def _partition_counts(
    admin: AIOKafkaAdminClient, names: list[str], with_leaders: bool = False
) -> dict[str, int]:
    """name -> partition count of the topics that exist (`with_leaders`: and whose every
    partition has a leader, i.e. can be written and read)."""
    existing = set(await admin.list_topics())
    wanted = [name for name in names if name in existing]
    if not wanted:
        return {}
    return {
        topic["topic"]: len(topic["partitions"])
        for topic in await admin.describe_topics(wanted)
        if topic["error_code"] == 0
        and topic["partitions"]
        and not (with_leaders and any(p["leader"] < 0 for p in topic["partitions"]))
    }


async def _until_visible(
    admin: AIOKafkaAdminClient, names: list[str], timeout_s: float
) -> dict[str, int]:
    """Partition counts once every topic in `names` shows in metadata with a leader for
    each partition: a broker applies a topic its controller created a moment later
    (KRaft), and a client that asks first finds no such topic, or no leader."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await _partition_counts(admin, names, with_leaders=True)
        missing = [name for name in names if name not in described]
        if not missing:
            return described
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerError(f"topics created but not in the cluster's metadata: {missing}")
        await asyncio.sleep(0.1)


async def _topic_configs(
    admin: AIOKafkaAdminClient, profile: KafkaProfile, names: list[str]
) -> dict[str, dict[str, str]]:
    try:
        return await _configs(admin, ConfigResourceType.TOPIC, names)
    except KafkaError as exc:
        if profile is KafkaProfile.EMBEDDED:  # Tansu's DescribeConfigs is partial
            log.debug("no topic configs from the embedded broker: %r", exc)
            return {}
        raise BrokerError(f"cannot read topic configurations: {exc!r}") from exc


async def _create(
    admin: AIOKafkaAdminClient, topics: list[PlannedTopic], replication_factor: int
) -> list[str]:
    log.info(
        "creating topics %s (replication factor %d)",
        [t.name for t in topics],
        replication_factor,
    )
    response: Any = await admin.create_topics(
        [
            NewTopic(
                name=t.name,
                num_partitions=t.partitions,
                replication_factor=replication_factor,
                topic_configs=dict(t.config),
            )
            for t in topics
        ]
    )
    created, refused = [], []
    for name, code, *rest in response.topic_errors:
        if code == 0:
            created.append(name)
        elif code != TopicAlreadyExistsError.errno:  # another component won the race
            refused.append(f"{name}: {_describe(code, rest[0] if rest else None)}")
    if refused:
        raise BrokerError(
            "Kafka refused to create topics ("
            + "; ".join(refused)
            + "). Without the right to create topics, an administrator creates them "
            "beforehand with `captionstream topics --create`."
        )
    return created
