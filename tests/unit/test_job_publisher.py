"""`KafkaJobPublisher.publish_submission`: PENDING first, so a compacted job-state topic
keeps each job's latest state (tests/integration/test_compaction.py runs it on a
compacting Apache Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from captionstream.errors import KafkaAccessDenied
from captionstream.ingest.kafka_publishing import KafkaJobPublisher
from captionstream.schemas.events import ImageSubmitted, JobState, JobStatus, decode_job_state
from captionstream.schemas.topics import TOPICS


class RecordingProducer:
    """The one producer method the publisher uses; fails for the topics in `failing`."""

    def __init__(
        self,
        failing: set[str] = frozenset(),  # type: ignore[assignment]
        error: type[Exception] = KafkaTimeoutError,
    ) -> None:
        self.failing = failing
        self.error = error
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic: str, value: bytes | None, key: bytes) -> None:
        if topic in self.failing:
            raise self.error()
        self.sent.append((topic, key, value))


def submission() -> tuple[JobState, ImageSubmitted]:
    event = ImageSubmitted(
        job_id="a" * 32,
        image_ref="file:///blobs/x.png",
        content_type="image/png",
        size_bytes=10,
        width=1,
        height=1,
        sha256="0" * 64,
        submitted_at=datetime(2026, 12, 1, tzinfo=UTC),
    )
    return JobState.submitted(event), event


async def test_pending_is_acknowledged_before_the_image_event_is_sent() -> None:
    producer = RecordingProducer()
    state, event = submission()
    await KafkaJobPublisher(producer).publish_submission(state, event)  # type: ignore[arg-type]
    assert [topic for topic, _, _ in producer.sent] == [TOPICS.job_state.name, TOPICS.images.name]
    (_, key, value) = producer.sent[0]
    assert key == event.job_id.encode()
    assert value is not None
    assert decode_job_state(value).status is JobStatus.PENDING


async def test_a_failed_image_event_deletes_the_pending_state_and_refuses_the_job() -> None:
    producer = RecordingProducer(failing={TOPICS.images.name})
    state, event = submission()
    with pytest.raises(KafkaTimeoutError):
        await KafkaJobPublisher(producer).publish_submission(state, event)  # type: ignore[arg-type]
    assert [(topic, value is None) for topic, _, value in producer.sent] == [
        (TOPICS.job_state.name, False),
        (TOPICS.job_state.name, True),  # the tombstone
    ]


async def test_a_failed_pending_state_refuses_the_job_before_any_image_event() -> None:
    producer = RecordingProducer(failing={TOPICS.job_state.name})
    state, event = submission()
    with pytest.raises(KafkaTimeoutError):
        await KafkaJobPublisher(producer).publish_submission(state, event)  # type: ignore[arg-type]
    assert producer.sent == []


async def test_a_topic_the_acls_deny_is_named_and_not_retried() -> None:
    producer = RecordingProducer(failing={TOPICS.images.name}, error=TopicAuthorizationFailedError)
    state, event = submission()
    with pytest.raises(KafkaAccessDenied, match=f"WRITE on topic {TOPICS.images.name}") as info:
        await KafkaJobPublisher(producer).publish_submission(state, event)  # type: ignore[arg-type]
    assert not info.value.retriable
    assert info.value.retry_after_s is None
    assert info.value.http_status == 503
    # The PENDING state written first is deleted again, as for any refused job.
    assert [(topic, value is None) for topic, _, value in producer.sent] == [
        (TOPICS.job_state.name, False),
        (TOPICS.job_state.name, True),
    ]
