"""Cancellation and expiry (processor.job_control) on dict tables, a blob store in
tmp_path and a fixed clock: what the job-control agent and the janitor do, no broker."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from captionstream.errors import BlobStoreUnavailable
from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.processor.faust_adapters import TableStateStore
from captionstream.processor.job_control import (
    JobControlHandler,
    expired_jobs,
    forget_job_state,
    request_expiries,
)
from captionstream.processor.pipeline import (
    CANCELLED,
    CaptionOutcome,
    Delivery,
    handle_batch,
    produced,
)
from captionstream.schemas.events import (
    CaptionFailed,
    CaptionProduced,
    ImageSubmitted,
    JobCancelRequested,
    JobExpiryDue,
    JobState,
    JobStatus,
    decode_job_control,
    decode_job_state,
)
from tests.helpers.images import make_png

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TTL_S = 3600.0


def finished(job_id: str, finished_at: datetime | None, image_ref: str | None = None) -> bytes:
    """A job's table value: terminal at `finished_at`, or STARTED when None."""
    state = JobState.pending(job_id, NOW - timedelta(days=1)).model_copy(
        update={"image_ref": image_ref}
    )
    if finished_at is None:
        state = state.advance(JobStatus.STARTED)
    else:
        state = state.advance(JobStatus.SUCCESS, caption="c", finished_at=finished_at)
    return state.model_dump_json().encode()


class Tombstones:
    def __init__(self) -> None:
        self.job_ids: list[str] = []

    async def __call__(self, job_id: str) -> None:
        self.job_ids.append(job_id)


def stored_image(blobs: LocalBlobStore, data: bytes, age_s: float) -> tuple[str, Path]:
    """An image in `blobs`, last stored `age_s` seconds ago."""
    ref = blobs.put_sync(data, hashlib.sha256(data).hexdigest(), ".png")
    path = blobs.path_of(ref)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return ref, path


def handler(
    jobs: dict[bytes, bytes],
    cancelled: dict[bytes, bytes],
    tombstones: Tombstones,
    blobs: Any,
    **kwargs: Any,
) -> JobControlHandler:
    return JobControlHandler(
        jobs=jobs,
        cancelled=cancelled,
        publish_tombstone=tombstones,
        blobs=blobs,
        job_ttl_s=TTL_S,
        **kwargs,
    )


def expiry(job_id: str, image_ref: str | None = None) -> bytes:
    return JobExpiryDue(job_id=job_id, image_ref=image_ref, due_at=NOW).model_dump_json().encode()


# --- the janitor ----------------------------------------------------------------------


async def test_the_janitor_asks_to_expire_only_jobs_finished_before_the_ttl() -> None:
    jobs = {
        b"old": finished("old", NOW - timedelta(seconds=TTL_S + 1), "file:///blobs/old.png"),
        b"at-cutoff": finished("at-cutoff", NOW - timedelta(seconds=TTL_S)),
        b"recent": finished("recent", NOW - timedelta(seconds=10)),
        b"running": finished("running", None),
        b"older": finished("older", NOW - timedelta(days=30)),
    }
    sent: list[tuple[bytes, bytes]] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append((key, value))

    asked = await request_expiries(jobs, now=NOW, ttl_s=TTL_S, send=send)

    assert asked == 2
    assert sorted(key for key, _ in sent) == [b"old", b"older"]
    requests = {key: decode_job_control(value) for key, value in sent}
    assert requests[b"old"] == JobExpiryDue(
        job_id="old", image_ref="file:///blobs/old.png", due_at=NOW
    )
    assert requests[b"older"].image_ref is None
    assert len(jobs) == 5, "asking deletes nothing: the job's partition does"


def test_a_job_never_finished_never_expires() -> None:
    jobs = {b"stuck": finished("stuck", None)}
    assert list(expired_jobs(jobs, NOW + timedelta(days=365), TTL_S)) == []


# --- expiry ---------------------------------------------------------------------------


async def test_an_expired_job_is_deleted_tombstoned_and_its_idle_image_deleted(
    tmp_path: Path,
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    ref, path = stored_image(blobs, make_png(3, 3), age_s=TTL_S + 60)
    jobs = {b"gone": finished("gone", NOW - timedelta(days=2), ref), b"kept": b"state"}
    cancelled = {b"gone": b"2024-04-29T00:00:00+00:00", b"kept": b"asked"}
    tombstones = Tombstones()

    await handler(jobs, cancelled, tombstones, blobs).handle(expiry("gone", ref))

    assert jobs == {b"kept": b"state"}
    assert cancelled == {b"kept": b"asked"}
    assert tombstones.job_ids == ["gone"]
    assert not path.exists()


async def test_an_image_a_newer_job_stored_again_is_kept(tmp_path: Path) -> None:
    """Content-addressed: a newer job with the same picture stored it again (its mtime
    is recent), so only the expired job's state goes."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    data = make_png(4, 4)
    ref, path = stored_image(blobs, data, age_s=TTL_S + 60)
    assert blobs.put_sync(data, hashlib.sha256(data).hexdigest(), ".png") == ref  # newer job
    jobs = {b"old": finished("old", NOW - timedelta(days=2), ref)}
    tombstones = Tombstones()

    assert await handler(jobs, {}, tombstones, blobs).expire(
        JobExpiryDue(job_id="old", image_ref=ref, due_at=NOW)
    )

    assert jobs == {}
    assert tombstones.job_ids == ["old"]
    assert path.read_bytes() == data


async def test_a_job_expired_already_is_left_alone(tmp_path: Path) -> None:
    """The janitor may ask twice; the second request must not tombstone again nor
    delete the image, which a job submitted since may use."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    ref, path = stored_image(blobs, make_png(5, 5), age_s=TTL_S + 60)
    tombstones = Tombstones()
    cancelled = {b"new": b"asked"}

    done = await handler({}, cancelled, tombstones, blobs).expire(
        JobExpiryDue(job_id="gone", image_ref=ref, due_at=NOW)
    )

    assert done is False
    assert tombstones.job_ids == []
    assert path.exists()
    assert cancelled == {b"new": b"asked"}


class UnavailableBlobStore:
    def __init__(self) -> None:
        self.asked: list[tuple[str, float]] = []

    def delete_if_idle_sync(self, ref: str, idle_s: float) -> bool:
        self.asked.append((ref, idle_s))
        raise BlobStoreUnavailable("the object store is down")


async def test_a_blob_store_failure_still_forgets_the_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blobs = UnavailableBlobStore()
    jobs = {b"j": finished("j", NOW - timedelta(days=2), "s3://bucket/j.png")}
    tombstones = Tombstones()

    with caplog.at_level(logging.WARNING, logger="processor.job_control"):
        assert await handler(jobs, {}, tombstones, blobs).expire(
            JobExpiryDue(job_id="j", image_ref="s3://bucket/j.png", due_at=NOW)
        )

    assert jobs == {}
    assert tombstones.job_ids == ["j"]
    assert blobs.asked == [("s3://bucket/j.png", TTL_S)], "idle for a whole TTL"
    assert "job j: image not deleted: the object store is down" in caplog.text


async def test_the_state_deletion_and_tombstone_are_one_unit_of_work_the_image_is_not() -> None:
    """Under exactly-once the table deletes and the tombstone commit together; the image
    is deleted after the unit (a blob store call must not hold commits back)."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def unit_of_work() -> AsyncIterator[None]:
        events.append("begin")
        yield
        events.append("end")

    async def tombstone(job_id: str) -> None:
        events.append(f"tombstone {job_id}")

    class RecordingBlobs:
        def delete_if_idle_sync(self, ref: str, idle_s: float) -> bool:
            events.append(f"delete {ref}")
            return True

    jobs = {b"j": finished("j", NOW - timedelta(days=2), "file:///x.png")}
    control = JobControlHandler(
        jobs=jobs,
        cancelled={},
        publish_tombstone=tombstone,
        blobs=RecordingBlobs(),  # type: ignore[arg-type]
        job_ttl_s=TTL_S,
        unit_of_work=unit_of_work,
    )
    await control.expire(JobExpiryDue(job_id="j", image_ref="file:///x.png", due_at=NOW))
    assert events == ["begin", "tombstone j", "end", "delete file:///x.png"]


def test_forget_job_state_reports_whether_there_was_a_job() -> None:
    jobs, cancelled = {b"a": b"s"}, {b"b": b"t"}
    assert forget_job_state("a", jobs, cancelled) is True
    assert forget_job_state("a", jobs, cancelled) is False
    assert forget_job_state("b", jobs, cancelled) is False, "a cancellation is no job"
    assert cancelled == {b"b": b"t"}


async def test_a_malformed_request_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs, cancelled = {b"j": b"s"}, {b"j": b"t"}
    tombstones = Tombstones()
    control = handler(jobs, cancelled, tombstones, UnavailableBlobStore())
    with caplog.at_level(logging.ERROR, logger="processor.job_control"):
        await control.handle(b'{"type": "job.expiry_due"}')
        await control.handle(None)
    assert jobs == {b"j": b"s"}
    assert cancelled == {b"j": b"t"}
    assert tombstones.job_ids == []
    assert caplog.text.count("ignoring a malformed job-control request") == 2


# --- cancellation, through the control handler and the batch -------------------------


class Origin:
    """Stands in for a Faust event (the table store makes it the current event)."""


class ListSink:
    def __init__(self) -> None:
        self.states: list[JobState] = []
        self.captions: list[CaptionProduced | CaptionFailed] = []

    async def publish_state(self, state: JobState) -> None:
        self.states.append(state)

    async def publish_caption(self, event: CaptionProduced | CaptionFailed) -> None:
        self.captions.append(event)

    async def schedule_retry(self, delivery: Delivery, not_before: datetime) -> None:
        raise AssertionError("nothing fails here")

    async def dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        raise AssertionError("nothing fails here")


def submitted(job_id: str) -> ImageSubmitted:
    return ImageSubmitted(
        job_id=job_id,
        image_ref=f"file:///blobs/{job_id}.png",
        content_type="image/png",
        size_bytes=1,
        width=1,
        height=1,
        sha256="0" * 64,
        submitted_at=NOW,
    )


def cancel(job_id: str) -> bytes:
    return JobCancelRequested(job_id=job_id, requested_at=NOW).model_dump_json().encode()


async def test_cancellation_stops_a_pending_job_but_not_a_started_or_finished_one() -> None:
    jobs: dict[bytes, bytes] = {}
    cancelled: dict[bytes, bytes] = {}
    pending, started, done = submitted("pending"), submitted("started"), submitted("done")
    jobs[b"started"] = (
        JobState.submitted(started)
        .advance(JobStatus.STARTED)
        .advance(JobStatus.RETRY, error="transient")
        .model_dump_json()
        .encode()
    )
    done_state = JobState.submitted(done).advance(JobStatus.STARTED)
    done_state = done_state.advance(JobStatus.SUCCESS, caption="earlier")
    jobs[b"done"] = done_state.model_dump_json().encode()
    control = handler(jobs, cancelled, Tombstones(), UnavailableBlobStore())
    for job_id in ("pending", "started", "done"):
        await control.handle(cancel(job_id))
    assert cancelled[b"pending"] == NOW.isoformat().encode()
    assert set(cancelled) == {b"pending", b"started", b"done"}

    captioned: list[str] = []

    async def run_captioning(batch: list[ImageSubmitted]) -> list[CaptionOutcome]:
        captioned.extend(job.job_id for job in batch)
        return [produced(job, "a caption", "fake") for job in batch]

    sink = ListSink()
    finals = await handle_batch(
        [
            Delivery(job.model_dump_json().encode(), Origin(), job.job_id.encode())
            for job in (pending, started, done)
        ],
        store=TableStateStore(jobs, cancelled),
        sink=sink,
        run_captioning=run_captioning,
    )

    assert captioned == ["started"], "a started job is not cancelled; a finished one skipped"
    by_id = {state.job_id: state for state in finals}
    assert set(by_id) == {"pending", "started"}
    assert by_id["pending"].status is JobStatus.FAILURE
    assert by_id["pending"].error == CANCELLED
    assert by_id["pending"].attempts == 0
    assert by_id["started"].status is JobStatus.SUCCESS
    assert decode_job_state(jobs[b"pending"]).status is JobStatus.FAILURE
    assert decode_job_state(jobs[b"done"]) == done_state, "a finished job is untouched"
    assert [c.job_id for c in sink.captions if isinstance(c, CaptionFailed)] == ["pending"]


async def test_expiring_a_cancelled_job_forgets_its_cancellation() -> None:
    jobs = {b"c": finished("c", NOW - timedelta(days=2))}
    cancelled: dict[bytes, bytes] = {}
    tombstones = Tombstones()
    control = handler(jobs, cancelled, tombstones, UnavailableBlobStore())
    await control.handle(cancel("c"))
    assert b"c" in cancelled
    await control.handle(expiry("c"))
    assert jobs == {}
    assert cancelled == {}
    assert tombstones.job_ids == ["c"]
