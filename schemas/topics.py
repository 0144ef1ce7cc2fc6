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


@dataclass(frozen=True, slots=True)
class Topics:
    # Image-reference events (`ImageSubmitted`), gateway/ingest -> processor. Internal.
    images: TopicSpec = TopicSpec("captionstream.images.v1")
    # Public results (`CaptionProduced` / `CaptionFailed`) for downstream consumers.
    captions: TopicSpec = TopicSpec("captionstream.captions.v1")
    # Latest `JobState` per job id; gateways materialize their view from it.
    job_state: TopicSpec = TopicSpec("captionstream.job-state.v1", compacted=True)

    def all(self) -> tuple[TopicSpec, ...]:
        return (self.images, self.captions, self.job_state)


TOPICS = Topics()
