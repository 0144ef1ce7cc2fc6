"""The Kafka ACLs each component needs, and the topic plan as text for an administrator.

Least privilege: each component's principal gets only what its clients do, read from
the code (which topics it produces to and reads, which consumer group it joins). With
the topics created beforehand (`captionstream topics --create`) no component needs
CREATE. Idempotent producers need only WRITE on their topics (Kafka 3.0+, KIP-679).
Each component also checks the whole topic plan at start (`ensure_topics`), so it may
DESCRIBE every topic of that plan and read its configuration (DESCRIBE_CONFIGS).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import CreateAclsRequest

from captionstream.errors import BrokerError
from captionstream.kafka.connection import KafkaConnection
from captionstream.kafka.topics import PROCESSOR_TABLES, PlannedTopic, changelog_topic, leader_topic
from captionstream.schemas.topics import TOPICS

# The protocol's codes (org.apache.kafka.common.resource / acl): only those used here.
RESOURCE_TYPES = {"TOPIC": 2, "GROUP": 3, "TRANSACTIONAL_ID": 5}
OPERATIONS = {"READ": 3, "WRITE": 4, "DESCRIBE": 8, "DESCRIBE_CONFIGS": 10}
PATTERN_TYPES = {"LITERAL": 3, "PREFIXED": 4}
ALLOW = 3


@dataclass(frozen=True, slots=True, order=True)
class Acl:
    resource_type: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    operation: str  # READ, WRITE, DESCRIBE
    pattern: str = "LITERAL"  # or PREFIXED


def _topics(operation: str, names: Iterable[str]) -> list[Acl]:
    return [Acl("TOPIC", name, op) for name in names for op in (operation, "DESCRIBE")]


def _checked(names: Iterable[str]) -> list[Acl]:
    """What a component's start-up check of the topic plan reads (`ensure_topics`): that
    each topic exists (DESCRIBE; a topic the principal cannot describe looks missing)
    and its cleanup policy (DESCRIBE_CONFIGS; without it the policy goes unchecked)."""
    return [Acl("TOPIC", name, op) for name in names for op in ("DESCRIBE", "DESCRIBE_CONFIGS")]


def component_acls(
    processor_group_id: str, webhook_group_id: str, *, transactional: bool
) -> dict[str, list[Acl]]:
    """Component -> the ACLs its principal needs (sorted, without repeats)."""
    t = TOPICS
    internal = [changelog_topic(processor_group_id, table) for table in PROCESSOR_TABLES]
    internal.append(leader_topic(processor_group_id))
    own = [spec.name for spec in t.all()]  # the gateway's and bulk ingest's start-up plan
    processor = [
        *_checked([*own, *internal]),
        *_topics("READ", [t.images.name, t.retries.name, t.control.name, *internal]),
        *_topics(
            "WRITE",
            [
                t.captions.name,
                t.job_state.name,
                t.retries.name,
                t.dead_letters.name,
                t.images.name,  # retries go back to the images topic when due
                t.control.name,  # the janitor asks for expiries
                *internal,
            ],
        ),
        Acl("GROUP", processor_group_id, "READ"),
    ]
    if transactional:
        processor.append(Acl("TRANSACTIONAL_ID", processor_group_id, "WRITE", "PREFIXED"))
        processor.append(Acl("TRANSACTIONAL_ID", processor_group_id, "DESCRIBE", "PREFIXED"))
    acls = {
        "gateway": [
            *_checked(own),
            # Submissions, caption-cache hits (caption event + state), cancellations.
            *_topics("WRITE", [t.images.name, t.job_state.name, t.captions.name, t.control.name]),
            *_topics("READ", [t.job_state.name]),  # the job view, webhooks
            Acl("GROUP", webhook_group_id, "READ"),
        ],
        "processor": processor,
        "ingest": [
            *_checked(own),
            *_topics("WRITE", [t.images.name, t.job_state.name]),
            *_topics("READ", [t.job_state.name]),
        ],
        "downstream consumer (captionstream tail)": _topics("READ", [t.captions.name]),
    }
    return {component: sorted(set(found)) for component, found in acls.items()}


def render_plan(
    plan: Iterable[PlannedTopic],
    replication_factor: int | None,
    acls: Mapping[str, list[Acl]],
) -> str:
    """The plan and the ACLs as text."""
    rf = "the brokers' default" if replication_factor is None else str(replication_factor)
    lines = [f"Topics (replication factor: {rf}):"]
    for topic in plan:
        config = ", ".join(f"{k}={v}" for k, v in sorted(topic.config.items())) or "-"
        lines.append(f"  {topic.name}  partitions={topic.partitions}  {config}")
    lines.append("")
    lines.append("ACLs, for the principal of each component (pattern LITERAL unless noted):")
    for component, found in acls.items():
        lines.append(f"  {component}:")
        grouped: defaultdict[tuple[str, str, str], list[str]] = defaultdict(list)
        for acl in found:
            grouped[(acl.resource_type, acl.name, acl.pattern)].append(acl.operation)
        for (kind, name, pattern), operations in grouped.items():
            suffix = "" if pattern == "LITERAL" else f" ({pattern})"
            lines.append(f"    {kind} {name}{suffix}: {', '.join(operations)}")
    return "\n".join(lines)


async def grant(
    connection: KafkaConnection, principal: str, acls: Iterable[Acl], timeout_s: float = 10
) -> int:
    """Allow `principal` (e.g. `User:worker`) each of `acls`, from any host; return how
    many were sent. Granting one again is harmless (Kafka keeps one binding). Needs a
    connection whose principal may ALTER the cluster (an administrator)."""
    client = connection.client(request_timeout_s=timeout_s)
    sent = 0
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        node_id = client.get_random_node()
        for acl in acls:
            request = CreateAclsRequest(
                RESOURCE_TYPES[acl.resource_type],
                acl.name,
                PATTERN_TYPES[acl.pattern],
                principal,
                "*",
                OPERATIONS[acl.operation],
                ALLOW,
            )
            response = await client.send(node_id, request)
            for error_code, message in response.creation_responses:
                if error_code:
                    raise BrokerError(
                        f"Kafka refused the ACL {acl.operation} on {acl.resource_type} "
                        f"{acl.name} for {principal}: {for_code(error_code).__name__}"
                        + (f" ({message})" if message else "")
                    )
            sent += 1
    except (TimeoutError, KafkaError, OSError) as exc:
        raise BrokerError(f"granting ACLs to {principal} failed: {exc!r}") from exc
    finally:
        await client.close()
    return sent
