"""`JobPublisher` on an aiokafka producer."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from schemas.events import ImageSubmitted, JobState
from schemas.topics import TOPICS


class KafkaJobPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        key = event.job_id.encode()
        # PENDING first: on the shared partition it precedes anything the processor writes.
        await self.producer.send_and_wait(
            TOPICS.job_state.name, state.model_dump_json().encode(), key=key
        )
        await self.producer.send_and_wait(
            TOPICS.images.name, event.model_dump_json().encode(), key=key
        )
