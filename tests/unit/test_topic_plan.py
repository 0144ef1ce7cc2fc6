"""The topic plan, its check against existing topics, and the ACLs per component: pure
functions (creation itself runs on Apache Kafka in tests/integration/test_topics.py)."""

from __future__ import annotations

from captionstream.kafka import topic_plan
from captionstream.kafka.acls import Acl, component_acls, render_plan
from captionstream.kafka.topics import PlannedTopic, check_existing
from captionstream.schemas.topics import TOPICS


def test_the_plan_holds_our_topics_and_fausts() -> None:
    plan = {t.name: t for t in topic_plan(6, "proc")}
    assert set(plan) == {
        *(spec.name for spec in TOPICS.all()),
        "proc-jobs-changelog",
        "proc-cancelled-changelog",
        "proc-__assignor-__leader",
    }
    assert plan[TOPICS.job_state.name].cleanup_policy == "compact"
    assert plan["proc-jobs-changelog"].cleanup_policy == "compact"
    assert plan[TOPICS.images.name].cleanup_policy == "delete"
    # The job table's changelog is co-partitioned with the images topic.
    assert plan["proc-jobs-changelog"].partitions == plan[TOPICS.images.name].partitions == 6
    assert plan["proc-__assignor-__leader"].partitions == 1


def test_existing_topics_are_checked_for_partitions_and_policy() -> None:
    plan = [PlannedTopic("a", 4, {"cleanup.policy": "compact"}), PlannedTopic("b", 2)]
    assert check_existing(plan, {"a": 4, "b": 2}, {"a": {"cleanup.policy": "compact"}}) == []
    problems = check_existing(plan, {"a": 3, "b": 2}, {"a": {"cleanup.policy": "delete"}, "b": {}})
    assert problems == [
        "topic a has 3 partitions, the plan 4 (CAPTIONSTREAM_PARTITIONS must match the "
        "existing topics)",
        "topic a has cleanup.policy=delete, the plan compact",
    ]
    # "compact,delete" is not "compact"; missing topics are not this check's business.
    assert check_existing(plan, {"a": 4}, {"a": {"cleanup.policy": "compact,delete"}})
    assert check_existing(plan, {}, {}) == []


def test_each_component_gets_only_what_its_clients_do() -> None:
    acls = component_acls("proc", "hooks", transactional=False)
    gateway = set(acls["gateway"])
    assert Acl("TOPIC", TOPICS.images.name, "WRITE") in gateway
    assert Acl("TOPIC", TOPICS.images.name, "READ") not in gateway
    assert Acl("GROUP", "hooks", "READ") in gateway
    assert not any(a.name == "proc-jobs-changelog" for a in gateway)
    # The start-up check sees every topic of the plan, even those the gateway never uses
    # (a topic it may not describe looks missing), and reads each one's cleanup policy.
    assert Acl("TOPIC", TOPICS.dead_letters.name, "DESCRIBE") in gateway
    assert Acl("TOPIC", TOPICS.dead_letters.name, "DESCRIBE_CONFIGS") in gateway
    assert Acl("TOPIC", TOPICS.dead_letters.name, "WRITE") not in gateway
    processor = set(acls["processor"])
    assert Acl("TOPIC", "proc-jobs-changelog", "WRITE") in processor
    assert Acl("GROUP", "proc", "READ") in processor
    assert not any(a.resource_type == "TRANSACTIONAL_ID" for a in processor)
    assert set(acls["downstream consumer (captionstream tail)"]) == {
        Acl("TOPIC", TOPICS.captions.name, "READ"),
        Acl("TOPIC", TOPICS.captions.name, "DESCRIBE"),
    }
    assert not any(a.operation == "CREATE" for found in acls.values() for a in found)
    transactional = component_acls("proc", "hooks", transactional=True)["processor"]
    assert Acl("TRANSACTIONAL_ID", "proc", "WRITE", "PREFIXED") in transactional


def test_the_plan_renders_for_an_administrator() -> None:
    text = render_plan(
        topic_plan(4, "proc"), None, component_acls("proc", "hooks", transactional=True)
    )
    assert "replication factor: the brokers' default" in text
    assert "captionstream.job-state.v1  partitions=4  cleanup.policy=compact" in text
    assert "TRANSACTIONAL_ID proc (PREFIXED): DESCRIBE, WRITE" in text
