"""`JobPublisher` and `CaptionCache` (ingest.submission) on an aiokafka producer: how
the gateway and bulk ingest put a job on Kafka."""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from captionstream.errors import KafkaAccessDenied
from captionstream.schemas.events import (
    CaptionProduced,
    ImageSubmitted,
    JobCancelRequested,
    JobState,
    utcnow,
)
from captionstream.schemas.topics import TOPICS

log = logging.getLogger(__name__)


async def send(producer: AIOKafkaProducer, topic: str, value: bytes | None, key: bytes) -> None:
    """One record, acknowledged; a topic the principal may not write to is named."""
    try:
        await producer.send_and_wait(topic, value, key=key)
    except TopicAuthorizationFailedError as exc:
        raise KafkaAccessDenied(
            f"Kafka denies this component's principal WRITE on topic {topic}; grant it "
            "the ACLs `captionstream topics` lists (`--grant COMPONENT=PRINCIPAL`)"
        ) from exc


class KafkaJobPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish_tombstone(self, job_id: str) -> None:
        """Delete the job from the compacted job-state topic (and from every view)."""
        await send(self.producer, TOPICS.job_state.name, None, job_id.encode())

    async def publish_cancel_request(self, job_id: str) -> None:
        request = JobCancelRequested(job_id=job_id, requested_at=utcnow())
        await send(
            self.producer, TOPICS.control.name, request.model_dump_json().encode(), job_id.encode()
        )

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        """The PENDING state first, acknowledged, then the image event.

        A worker writes a job's states only after it read the image event, so in this
        order PENDING precedes every later state on the job's partition of the compacted
        job-state topic, and the record compaction keeps (the last) is the job's latest
        state. (With the image event first, a fast worker's SUCCESS could precede PENDING,
        and a gateway started after the log cleaner ran showed the job PENDING forever.)
        Both must succeed for the job to be accepted; if the image event fails, the
        PENDING state is deleted again and the error reaches the caller (503).
        """
        key = event.job_id.encode()
        await send(self.producer, TOPICS.job_state.name, state.model_dump_json().encode(), key)
        try:
            await send(self.producer, TOPICS.images.name, event.model_dump_json().encode(), key)
        except (KafkaError, KafkaAccessDenied):
            try:
                await self.publish_tombstone(event.job_id)
            except KafkaError as exc:
                log.warning("job %s refused; its PENDING state could not be deleted: %r", key, exc)
            raise


class CaptionIndex(Protocol):
    """SUCCESS states by caption-cache key (the gateway's `JobView` is one)."""

    def find_cached(self, cache_key: str) -> JobState | None: ...


class KafkaCaptionCache:
    """`CaptionCache` on an index of finished jobs and a producer."""

    def __init__(self, index: CaptionIndex, producer: AIOKafkaProducer) -> None:
        self.index = index
        self.producer = producer

    def lookup(self, cache_key: str) -> JobState | None:
        return self.index.find_cached(cache_key)

    async def publish_hit(self, state: JobState, event: CaptionProduced) -> None:
        key = state.job_id.encode()
        # The caption event first, like the processor: a SUCCESS state always has one.
        await send(self.producer, TOPICS.captions.name, event.model_dump_json().encode(), key)
        await send(self.producer, TOPICS.job_state.name, state.model_dump_json().encode(), key)
