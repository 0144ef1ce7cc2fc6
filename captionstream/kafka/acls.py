"""The Kafka ACLs each component needs, and the topic plan as text for an administrator.

Least privilege: each component's principal gets only what its clients do, read from
the code (which topics it produces to and reads, which consumer group it joins). With
the topics created beforehand (`captionstream topics --create`) no component needs
CREATE. Idempotent producers need only WRITE on their topics (Kafka 3.0+, KIP-679).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from captionstream.kafka.topics import PROCESSOR_TABLES, PlannedTopic, changelog_topic, leader_topic
from schemas.topics import TOPICS


@dataclass(frozen=True, slots=True, order=True)
class Acl:
    resource_type: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    operation: str  # READ, WRITE, DESCRIBE
    pattern: str = "LITERAL"  # or PREFIXED


def _topics(operation: str, names: Iterable[str]) -> list[Acl]:
    return [Acl("TOPIC", name, op) for name in names for op in (operation, "DESCRIBE")]


def component_acls(
    processor_group_id: str, webhook_group_id: str, *, transactional: bool
) -> dict[str, list[Acl]]:
    """Component -> the ACLs its principal needs (sorted, without repeats)."""
    t = TOPICS
    internal = [changelog_topic(processor_group_id, table) for table in PROCESSOR_TABLES]
    internal.append(leader_topic(processor_group_id))
    processor = [
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
            # Submissions, caption-cache hits (caption event + state), cancellations.
            *_topics("WRITE", [t.images.name, t.job_state.name, t.captions.name, t.control.name]),
            *_topics("READ", [t.job_state.name]),  # the job view, webhooks
            Acl("GROUP", webhook_group_id, "READ"),
        ],
        "processor": processor,
        "ingest": [
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
