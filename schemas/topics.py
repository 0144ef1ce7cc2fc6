"""Topic names and layouts: the one place they are defined.

Every topic is keyed by job id, so all events of one job land on one partition, in order.
The `.v1` suffix is the contract version of the events on the topic: a breaking change
gets a new topic next to the old one rather than surprising existing consumers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    compacted: bool = False
    retention_ms: int | None = None  # None: the broker's default (7 days on Apache Kafka)


@dataclass(frozen=True, slots=True)
class Topics:
    # Image-reference events (`ImageSubmitted`), gateway/ingest -> processor. Internal.
    images: TopicSpec = TopicSpec("captionstream.images.v1")
    # Public results (`CaptionProduced` / `CaptionFailed`) for downstream consumers.
    captions: TopicSpec = TopicSpec("captionstream.captions.v1")
    # Latest `JobState` per job id; gateways materialize their view from it.
    job_state: TopicSpec = TopicSpec("captionstream.job-state.v1", compacted=True)
    # Image events waiting out a retry backoff (header `not-before`). Internal.
    retries: TopicSpec = TopicSpec("captionstream.images.retry.v1")
    # Messages that could not be processed, verbatim, with the reason in headers.
    # Kept 30 days: long enough for someone to look at them and replay them.
    dead_letters: TopicSpec = TopicSpec(
        "captionstream.dead-letters.v1", retention_ms=30 * 24 * 3600 * 1000
    )
    # Requests about existing jobs (`JobCancelRequested`, `JobExpiryDue`) to the
    # processor. Internal. A topic of its own, so a cancellation is seen long before a
    # backlog of images reaches the job.
    control: TopicSpec = TopicSpec("captionstream.job-control.v1")

    def all(self) -> tuple[TopicSpec, ...]:
        return (
            self.images,
            self.captions,
            self.job_state,
            self.retries,
            self.dead_letters,
            self.control,
        )


class Headers:
    """Kafka header names this project writes (values are UTF-8)."""

    NOT_BEFORE = "captionstream-not-before"  # ISO-8601 UTC: when a retry is due
    REASON = "captionstream-reason"  # why a message was dead-lettered
    ATTEMPTS = "captionstream-attempts"  # processing attempts made before dead-lettering
    SOURCE_TOPIC = "captionstream-source-topic"
    FAILED_AT = "captionstream-failed-at"


TOPICS = Topics()
