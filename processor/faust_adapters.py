"""The processor's ports on Faust: `pipeline.JobStateStore` on the job tables,
`pipeline.ResultSink` on the output topics, and the janitor's sends to the job-control
topic."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import faust

from captionstream.kafka.compat import as_current_event
from captionstream.processor.pipeline import Delivery
from captionstream.schemas.events import (
    CaptionFailed,
    CaptionProduced,
    JobState,
    decode_job_state,
    utcnow,
)
from captionstream.schemas.topics import TOPICS, Headers


class TableStateStore:
    """`JobStateStore` on Faust tables keyed by job id (`jobs`: states, `cancelled`:
    cancellation requests).

    Faust's rocksdb store reads and writes the partition of "the current event". In a
    batch we handle many events from several partitions, so every read and write names
    its own event: reading with another job's event in context looked in the wrong
    partition and missed (redeliveries then looked new, cancellations went unseen).
    """

    def __init__(self, jobs: Any, cancelled: Any) -> None:
        self.jobs = jobs
        self.cancelled = cancelled

    def get(self, job_id: str, origin: Any) -> JobState | None:
        with as_current_event(origin):
            raw = self.jobs.get(job_id.encode())
        return None if raw is None else decode_job_state(raw)

    def is_cancelled(self, job_id: str, origin: Any) -> bool:
        with as_current_event(origin):
            return self.cancelled.get(job_id.encode()) is not None

    def put(self, state: JobState, origin: Any) -> None:
        with as_current_event(origin):
            self.jobs[state.job_id.encode()] = state.model_dump_json().encode()


async def send_acked(
    topic: faust.TopicT,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes] | None = None,
) -> None:
    """Send one record and return once the broker acknowledged it."""
    fut = await topic.send(key=key, value=value, headers=headers)
    await fut


class TopicSink:
    """`ResultSink` on Faust topics; each send is awaited until the broker acked it."""

    def __init__(
        self,
        captions: faust.TopicT,
        job_state: faust.TopicT,
        retries: faust.TopicT,
        dead_letters: faust.TopicT,
        on_dead_letter: Callable[[], object] = lambda: None,
    ) -> None:
        self.captions = captions
        self.job_state = job_state
        self.retries = retries
        self.dead_letters = dead_letters
        self.on_dead_letter = on_dead_letter

    async def forget(self, job_id: str) -> None:
        """A tombstone on the compacted job-state topic: gateways drop the job."""
        await send_acked(self.job_state, job_id.encode(), None)

    async def publish_state(self, state: JobState) -> None:
        await send_acked(self.job_state, state.job_id.encode(), state.model_dump_json().encode())

    async def publish_caption(self, event: CaptionProduced | CaptionFailed) -> None:
        await send_acked(self.captions, event.job_id.encode(), event.model_dump_json().encode())

    async def schedule_retry(self, delivery: Delivery, not_before: datetime) -> None:
        headers = {Headers.NOT_BEFORE: not_before.isoformat().encode()}
        await send_acked(self.retries, delivery.key, delivery.value, headers)

    async def dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        headers = {
            Headers.REASON: reason.encode(),
            Headers.ATTEMPTS: str(attempts).encode(),
            Headers.SOURCE_TOPIC: TOPICS.images.name.encode(),
            Headers.FAILED_AT: utcnow().isoformat().encode(),
        }
        await send_acked(self.dead_letters, delivery.key, delivery.value, headers)
        self.on_dead_letter()


class ControlRequestSender:
    """Sends the janitor's requests to the job-control topic.

    Under exactly-once, outside any transaction: one on an idle partition would stay
    open (no offsets to commit it with) until the broker aborts it. A request sent twice
    is harmless (the deletion checks the table).
    """

    def __init__(self, app: faust.App, control: faust.TopicT, *, exactly_once: bool) -> None:
        self.app = app
        self.control = control
        self.exactly_once = exactly_once

    async def __call__(self, key: bytes, value: bytes) -> None:
        if self.exactly_once:
            await self.app.producer.send_and_wait(
                self.control.get_topic_name(), key, value, None, None, None
            )
        else:
            await self.control.send(key=key, value=value)
