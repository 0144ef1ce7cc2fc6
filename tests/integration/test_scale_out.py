"""Two workers in one consumer group; one is SIGKILLed in the middle of the work.

Every accepted job must still end SUCCESS, exactly one caption per job must be visible
(duplicates on the captions topic are allowed, but they must agree and share an event
id), and the survivor must have taken over the dead worker's partitions.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator

import pytest

from captionstream.schemas.events import (
    JobStatus,
    decode_job_state,
)
from captionstream.schemas.topics import TOPICS
from tests.integration.stack import (
    Stack,
    all_succeed,
    check_one_caption_per_job,
    own_stack,
    read_topic,
    sigkill_mid_batch,
    submit_images,
    wait_for_one_generation,
)

# On the embedded broker in `make soak` only: test_s3_blobstore's cross-host test already
# SIGKILLs one of two workers mid-batch there, in `make test`.
pytestmark = pytest.mark.brokers("embedded", "apache", soak_on=("embedded",))

JOBS = 240


@pytest.fixture
def two_workers(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("scale"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
        CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.05",
        CAPTIONSTREAM_MAX_BATCH_SIZE="8",
    ) as stack:
        yield stack


async def test_sigkill_one_of_two_workers_loses_no_job(two_workers: Stack) -> None:
    stack = two_workers
    doomed, survivor = stack.start_workers(2)
    gateway = stack.start_gateway()

    # Both workers own partitions before the load starts.
    wait_for_one_generation(doomed, survivor, timeout_s=30)

    # Watching for the moment to kill starts with the submissions, not after them: the
    # kill lands early in the doomed worker's share (>= 6 s of captioning), never after
    # it (a slow submission could let it finish first).
    submitting = asyncio.create_task(submit_images(gateway, JOBS))
    await sigkill_mid_batch(stack, doomed)
    job_ids = await submitting
    views = await all_succeed(gateway, job_ids)
    assert survivor.alive()

    captions = await check_one_caption_per_job(stack.bootstrap, views, job_ids)
    assert set(captions) >= set(job_ids), "a caption event for every job"
    # The batch the dead worker had started was redone by the survivor.
    started: dict[str, int] = defaultdict(int)
    for key, value in await read_topic(stack.bootstrap, TOPICS.job_state.name):
        if decode_job_state(value).status is JobStatus.STARTED:
            started[key.decode()] += 1
    assert any(count >= 2 for count in started.values()), "some job was started twice"
