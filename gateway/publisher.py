"""`JobPublisher` on an aiokafka producer."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.view import JobView
from schemas.events import CaptionProduced, ImageSubmitted, JobCancelRequested, JobState, utcnow
from schemas.topics import TOPICS

log = logging.getLogger(__name__)


class KafkaJobPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish_tombstone(self, job_id: str) -> None:
        """Delete the job from the compacted job-state topic (and from every view)."""
        await self.producer.send_and_wait(TOPICS.job_state.name, None, key=job_id.encode())

    async def publish_cancel_request(self, job_id: str) -> None:
        request = JobCancelRequested(job_id=job_id, requested_at=utcnow())
        await self.producer.send_and_wait(
            TOPICS.control.name, request.model_dump_json().encode(), key=job_id.encode()
        )

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        key = event.job_id.encode()
        # The image event is the point of acceptance: if it fails, nothing was published
        # and the caller answers 503. The PENDING state only makes the job visible to
        # other gateway replicas before the processor reports on it; losing it loses no
        # job, and the view never lets PENDING replace a later state.
        await self.producer.send_and_wait(
            TOPICS.images.name, event.model_dump_json().encode(), key=key
        )
        try:
            await self.producer.send_and_wait(
                TOPICS.job_state.name, state.model_dump_json().encode(), key=key
            )
        except KafkaError as exc:
            log.warning("job %s accepted; its PENDING state was not published: %r", key, exc)


class KafkaCaptionCache:
    """`CaptionCache` on the gateway's job view (which indexes SUCCESS states by cache
    key) and its producer."""

    def __init__(self, view: JobView, producer: AIOKafkaProducer) -> None:
        self.view = view
        self.producer = producer

    def lookup(self, cache_key: str) -> JobState | None:
        return self.view.find_cached(cache_key)

    async def publish_hit(self, state: JobState, event: CaptionProduced) -> None:
        key = state.job_id.encode()
        # The caption event first, like the processor: a SUCCESS state always has one.
        await self.producer.send_and_wait(
            TOPICS.captions.name, event.model_dump_json().encode(), key=key
        )
        await self.producer.send_and_wait(
            TOPICS.job_state.name, state.model_dump_json().encode(), key=key
        )
