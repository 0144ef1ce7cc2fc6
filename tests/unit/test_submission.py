"""Accepting an image as a job, with fakes for the publisher and the caption cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.ingest.submission import submit_image
from captionstream.ingest.validation import ImageLimits
from captionstream.schemas.events import (
    CaptionProduced,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    caption_cache_key,
    caption_event_id,
)
from tests.helpers.images import make_png


class RecordingPublisher:
    def __init__(self) -> None:
        self.submissions: list[tuple[JobState, ImageSubmitted]] = []

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        self.submissions.append((state, event))


class DictCache:
    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.hits: list[tuple[JobState, CaptionProduced]] = []

    def lookup(self, cache_key: str) -> JobState | None:
        return self.states.get(cache_key)

    async def publish_hit(self, state: JobState, event: CaptionProduced) -> None:
        self.hits.append((state, event))


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path)


async def test_a_miss_publishes_the_image_event(blobs: LocalBlobStore) -> None:
    publisher, cache = RecordingPublisher(), DictCache()
    state, event = await submit_image(
        make_png(), "a.png", limits=ImageLimits(), blobs=blobs, publisher=publisher, cache=cache
    )
    assert state.status is JobStatus.PENDING
    assert state.cache_key == caption_cache_key(event.sha256, GenerationOptions())
    assert publisher.submissions == [(state, event)]
    assert cache.hits == []


async def test_a_hit_answers_at_once_without_the_model(blobs: LocalBlobStore) -> None:
    publisher, cache = RecordingPublisher(), DictCache()
    first, event = await submit_image(
        make_png(), "a.png", limits=ImageLimits(), blobs=blobs, publisher=publisher
    )
    assert first.cache_key is not None
    done = first.advance(JobStatus.STARTED).advance(
        JobStatus.SUCCESS, caption="a red square", model="tiny-blip"
    )
    cache.states[first.cache_key] = done

    state, again = await submit_image(
        make_png(), "b.png", limits=ImageLimits(), blobs=blobs, publisher=publisher, cache=cache
    )

    assert len(publisher.submissions) == 1, "no image event: the model does not run"
    assert state.status is JobStatus.SUCCESS
    assert state.caption == "a red square"
    assert state.cached_from == first.job_id
    assert state.job_id != first.job_id
    [(published, caption_event)] = cache.hits
    assert published == state
    assert caption_event.job_id == state.job_id
    assert caption_event.event_id == caption_event_id(state.job_id, state.submitted_at)
    assert caption_event.caption == "a red square"
    assert caption_event.model == "tiny-blip"
    assert caption_event.sha256 == again.sha256 == event.sha256


async def test_a_hit_leaves_the_stored_image_alone(blobs: LocalBlobStore) -> None:
    """Storing it again would mark the blob "in use", and the expiry of the job that made
    the caption would then keep it forever (no job left to delete it)."""
    publisher, cache = RecordingPublisher(), DictCache()
    first, _ = await submit_image(
        make_png(), "a.png", limits=ImageLimits(), blobs=blobs, publisher=publisher
    )
    assert first.cache_key is not None
    assert first.image_ref is not None
    cache.states[first.cache_key] = first.advance(JobStatus.SUCCESS, caption="x", model="m")
    stored = blobs.path_of(first.image_ref)
    os.utime(stored, (1_000_000, 1_000_000))  # last used long ago

    state, _ = await submit_image(
        make_png(), "b.png", limits=ImageLimits(), blobs=blobs, publisher=publisher, cache=cache
    )

    assert state.cached_from == first.job_id
    assert state.image_ref == first.image_ref
    assert stored.stat().st_mtime == 1_000_000
    assert blobs.delete_if_idle_sync(first.image_ref, idle_s=60)


async def test_other_options_are_a_miss(blobs: LocalBlobStore) -> None:
    publisher, cache = RecordingPublisher(), DictCache()
    first, _ = await submit_image(
        make_png(), "a.png", limits=ImageLimits(), blobs=blobs, publisher=publisher
    )
    assert first.cache_key is not None
    cache.states[first.cache_key] = first.advance(JobStatus.SUCCESS, caption="x")
    state, _ = await submit_image(
        make_png(),
        "a.png",
        limits=ImageLimits(),
        blobs=blobs,
        publisher=publisher,
        cache=cache,
        options=GenerationOptions(prompt="a photo of"),
    )
    assert state.status is JobStatus.PENDING
    assert cache.hits == []


async def test_an_idempotency_key_gives_the_same_job_id_everywhere(
    blobs: LocalBlobStore,
) -> None:
    """Replicas racing on one key publish one job id, so the log decides between them."""
    publisher = RecordingPublisher()

    async def submit(key: str | None) -> str:
        state, _ = await submit_image(
            make_png(),
            "a.png",
            limits=ImageLimits(),
            blobs=blobs,
            publisher=publisher,
            idempotency_key=key,
        )
        return state.job_id

    assert await submit("key-1") == await submit("key-1")
    assert await submit("key-1") != await submit("key-2")
    assert await submit(None) != await submit(None)
