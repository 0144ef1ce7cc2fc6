"""The processor's batch logic with a fake captioner, a dict store and a list sink."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captionstream.errors import ImageUnreadable
from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.processor.pipeline import (
    CaptionOutcome,
    Delivery,
    JobFailure,
    RetryPolicy,
    caption_batch,
    decode_rgb,
    handle_batch,
)
from captionstream.schemas.events import (
    CaptionFailed,
    CaptionProduced,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    caption_event_id,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class SizeCaptioner:
    """Captions an image with its size; records every call."""

    name = "fake-size"

    def __init__(self, poison: tuple[int, int] | None = None) -> None:
        self.poison = poison
        self.calls: list[list[tuple[int, int]]] = []
        self.options: list[list[GenerationOptions]] = []

    def caption(self, images: Sequence[Any], options: Sequence[GenerationOptions]) -> list[str]:
        sizes = [img.size for img in images]
        self.calls.append(sizes)
        self.options.append(list(options))
        if self.poison in sizes:
            raise RuntimeError(f"model blew up on {self.poison}")
        return [f"{w}x{h}" for w, h in sizes]


class ShortCaptioner(SizeCaptioner):
    """Returns one caption too few when given a batch (a broken model)."""

    def caption(self, images: Sequence[Any], options: Sequence[GenerationOptions]) -> list[str]:
        out = super().caption(images, options)
        return out[:-1] if len(out) > 1 else out


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (1, 2, 3) if mode == "RGB" else 7).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def submit(
    store: LocalBlobStore,
    job_id: str,
    data: bytes,
    options: GenerationOptions | None = None,
) -> ImageSubmitted:
    sha = hashlib.sha256(data).hexdigest()
    ref = store.put_sync(data, sha, ".png")
    return ImageSubmitted(
        job_id=job_id,
        image_ref=ref,
        content_type="image/png",
        size_bytes=len(data),
        width=1,
        height=1,
        sha256=sha,
        submitted_at=T0,
        options=options or GenerationOptions(),
    )


def missing(store: LocalBlobStore, job_id: str) -> ImageSubmitted:
    job = submit(store, job_id, png((9, 9)) + job_id.encode())
    store.path_of(job.image_ref).unlink()
    return job


def job_id_of(outcome: CaptionOutcome) -> str:
    return outcome.job_id if isinstance(outcome, CaptionProduced) else outcome.job.job_id


def captions(results: Sequence[CaptionOutcome]) -> list[str | None]:
    return [r.caption if isinstance(r, CaptionProduced) else None for r in results]


# --- decode_rgb -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "1"])
def test_decode_rgb_converts_to_rgb(mode: str) -> None:
    img = decode_rgb(png((20, 10), mode), max_pixels=10_000)
    assert img.mode == "RGB"
    assert img.size == (20, 10)


def test_decode_rgb_applies_exif_orientation() -> None:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 10)).save(buf, "JPEG", exif=exif)
    assert decode_rgb(buf.getvalue(), max_pixels=10_000).size == (10, 40)


def jpeg(size: tuple[int, int], exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, "JPEG", exif=exif or Image.Exif())
    return buf.getvalue()


def test_decode_rgb_drafts_a_large_jpeg_down_to_the_model_input_size() -> None:
    """A 2000x1500 JPEG for a 384x384 model decodes at half size: the largest of 1/2,
    1/4, 1/8 that keeps both sides >= 384."""
    img = decode_rgb(jpeg((2000, 1500)), max_pixels=10**8, draft_to=(384, 384))
    assert img.size == (1000, 750)
    assert img.mode == "RGB"
    assert decode_rgb(jpeg((2000, 1500)), max_pixels=10**8).size == (2000, 1500)
    tiny_target = decode_rgb(jpeg((2000, 1500)), max_pixels=10**8, draft_to=(32, 32))
    assert tiny_target.size == (250, 188), "at most 1/8"


def test_decode_rgb_draft_keeps_small_images_and_other_formats_whole() -> None:
    assert decode_rgb(jpeg((500, 400)), 10**8, draft_to=(384, 384)).size == (500, 400)
    assert decode_rgb(png((2000, 1500)), 10**8, draft_to=(384, 384)).size == (2000, 1500)


def test_decode_rgb_draft_then_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img = decode_rgb(jpeg((1600, 800), exif), max_pixels=10**8, draft_to=(384, 384))
    assert img.size == (400, 800), "drafted to 1/2 (800x400), then turned upright"


def test_decode_rgb_checks_limits_on_the_stored_size_not_the_drafted_one() -> None:
    with pytest.raises(ImageUnreadable, match="pixels"):
        decode_rgb(jpeg((2000, 1500)), max_pixels=2_999_999, draft_to=(384, 384))


def test_decode_rgb_refuses_too_many_pixels() -> None:
    with pytest.raises(ImageUnreadable, match="200 pixels"):
        decode_rgb(png((20, 10)), max_pixels=199)


@pytest.mark.parametrize("data", [b"", b"garbage", png((50, 50))[:60]])
def test_decode_rgb_raises_image_unreadable(data: bytes) -> None:
    with pytest.raises(ImageUnreadable, match="cannot decode"):
        decode_rgb(data, max_pixels=10_000)


# --- caption_batch --------------------------------------------------------------------


def test_caption_batch_one_result_per_job_in_order(store: LocalBlobStore) -> None:
    jobs = [submit(store, f"job-{i}", png((10 + i, 20 + i))) for i in range(4)]
    captioner = SizeCaptioner()
    results = caption_batch(jobs, store.get_sync, captioner)
    assert [r.job_id for r in results] == [j.job_id for j in jobs]
    assert captions(results) == ["10x20", "11x21", "12x22", "13x23"]
    assert captioner.calls == [[(10, 20), (11, 21), (12, 22), (13, 23)]]  # one batched call
    for job, result in zip(jobs, results, strict=True):
        assert isinstance(result, CaptionProduced)
        assert result.event_id == caption_event_id(job.job_id, job.submitted_at)
        assert result.model == "fake-size"
        assert result.sha256 == job.sha256
        assert result.image_ref == job.image_ref
        assert result.submitted_at == job.submitted_at


def test_caption_batch_decodes_jpegs_for_the_captioners_input_size(
    store: LocalBlobStore,
) -> None:
    captioner = SizeCaptioner()
    captioner.input_size = (384, 384)  # type: ignore[attr-defined]
    big = submit(store, "big", jpeg((2000, 1500)))
    [result] = caption_batch([big], store.get_sync, captioner)
    assert isinstance(result, CaptionProduced)
    assert result.caption == "1000x750"
    plain = SizeCaptioner()  # no input_size: decoded whole
    [whole] = caption_batch([big], store.get_sync, plain)
    assert isinstance(whole, CaptionProduced)
    assert whole.caption == "2000x1500"


def test_caption_batch_passes_each_jobs_options(store: LocalBlobStore) -> None:
    opts = [GenerationOptions(prompt="a photo of"), GenerationOptions(max_new_tokens=3)]
    jobs = [submit(store, f"job-{i}", png((5 + i, 5)), opts[i]) for i in range(2)]
    captioner = SizeCaptioner()
    caption_batch(jobs, store.get_sync, captioner)
    assert captioner.options == [opts]


def test_caption_batch_empty() -> None:
    captioner = SizeCaptioner()
    assert caption_batch([], lambda ref: b"", captioner) == []
    assert captioner.calls == []


def test_missing_or_corrupt_blob_fails_only_its_job(store: LocalBlobStore) -> None:
    good_a = submit(store, "good-a", png((30, 10)))
    gone = missing(store, "gone")
    corrupt = submit(store, "corrupt", b"this is not an image")
    outside = good_a.model_copy(update={"job_id": "forged", "image_ref": "file:///etc/passwd"})
    good_b = submit(store, "good-b", png((31, 11)))
    jobs = [good_a, gone, corrupt, outside, good_b]
    captioner = SizeCaptioner()

    results = caption_batch(jobs, store.get_sync, captioner)

    assert [job_id_of(r) for r in results] == ["good-a", "gone", "corrupt", "forged", "good-b"]
    assert captions(results) == ["30x10", None, None, None, "31x11"]
    assert captioner.calls == [[(30, 10), (31, 11)]]  # bad images never reach the model
    for result in results[1:4]:
        assert isinstance(result, JobFailure)
        assert result.error
        assert not result.retriable, "a missing or corrupt image cannot improve by retrying"
    errors = [r.error for r in results if isinstance(r, JobFailure)]
    assert "not in the blob store" in errors[0]
    assert "cannot decode" in errors[1]
    assert "outside" in errors[2]


def test_too_many_pixels_fails_only_its_job(store: LocalBlobStore) -> None:
    jobs = [submit(store, "big", png((100, 100))), submit(store, "small", png((5, 5)))]
    results = caption_batch(jobs, store.get_sync, SizeCaptioner(), max_pixels=1000)
    assert captions(results) == [None, "5x5"]


def test_all_jobs_bad_never_calls_the_captioner(store: LocalBlobStore) -> None:
    captioner = SizeCaptioner()
    results = caption_batch([missing(store, "a"), missing(store, "b")], store.get_sync, captioner)
    assert [type(r) for r in results] == [JobFailure, JobFailure]
    assert captioner.calls == []


def test_captioner_failing_on_one_image_fails_only_that_job(store: LocalBlobStore) -> None:
    jobs = [submit(store, f"job-{i}", png((10 + i, 10))) for i in range(3)]
    captioner = SizeCaptioner(poison=(11, 10))

    results = caption_batch(jobs, store.get_sync, captioner)

    assert [job_id_of(r) for r in results] == ["job-0", "job-1", "job-2"]
    assert captions(results) == ["10x10", None, "12x10"]
    failure = results[1]
    assert isinstance(failure, JobFailure)
    assert failure.retriable, "an unexpected model error is assumed transient"
    assert "RuntimeError" in failure.error
    assert "blew up" in failure.error
    # the batch call, then one call per image
    assert captioner.calls == [[(10, 10), (11, 10), (12, 10)], [(10, 10)], [(11, 10)], [(12, 10)]]


def test_captioner_failing_on_a_single_job_batch(store: LocalBlobStore) -> None:
    job = submit(store, "only", png((7, 7)))
    results = caption_batch([job], store.get_sync, SizeCaptioner(poison=(7, 7)))
    assert len(results) == 1
    assert isinstance(results[0], JobFailure)
    assert results[0].job.job_id == "only"
    assert "blew up" in results[0].error


def test_captioner_returning_too_few_captions_falls_back_to_one_by_one(
    store: LocalBlobStore,
) -> None:
    jobs = [submit(store, f"job-{i}", png((10 + i, 10))) for i in range(3)]
    captioner = ShortCaptioner()
    results = caption_batch(jobs, store.get_sync, captioner)
    assert captions(results) == ["10x10", "11x10", "12x10"]
    assert len(captioner.calls) == 4


def test_reference_with_nul_byte_fails_only_its_job(store: LocalBlobStore) -> None:
    good = submit(store, "good", png((8, 8)))
    forged = good.model_copy(
        update={"job_id": "forged", "image_ref": store.root.as_uri() + "/ab/%00.png"}
    )
    results = caption_batch([good, forged], store.get_sync, SizeCaptioner())
    assert captions(results) == ["8x8", None]


# --- handle_batch ---------------------------------------------------------------------


class DictStore:
    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.puts: list[tuple[JobState, Any]] = []
        self.cancelled: set[str] = set()

    def is_cancelled(self, job_id: str, origin: Any) -> bool:
        return job_id in self.cancelled

    def get(self, job_id: str, origin: Any) -> JobState | None:
        return self.states.get(job_id)

    def put(self, state: JobState, origin: Any) -> None:
        self.states[state.job_id] = state
        self.puts.append((state, origin))


class ListSink:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    async def publish_state(self, state: JobState) -> None:
        self.log.append(("state", state))

    async def publish_caption(self, event: CaptionProduced | CaptionFailed) -> None:
        self.log.append(("caption", event))

    async def schedule_retry(self, delivery: Delivery, not_before: datetime) -> None:
        self.log.append(("retry", (delivery, not_before)))

    async def dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        self.log.append(("dead", (delivery, reason, attempts)))

    def of(self, kind: str) -> list[Any]:
        return [item for k, item in self.log if k == kind]

    def summary(self) -> list[tuple[str, str, str]]:
        out = []
        for kind, item in self.log:
            if kind in ("state", "caption"):
                what = item.status.value if kind == "state" else item.type
                out.append((kind, item.job_id, what))
        return out


class Runner:
    """`run_captioning` over the real `caption_batch`; records which jobs it was given."""

    def __init__(self, blobs: LocalBlobStore, captioner: SizeCaptioner | None = None) -> None:
        self.blobs = blobs
        self.captioner = captioner or SizeCaptioner()
        self.batches: list[list[str]] = []

    async def __call__(self, jobs: list[ImageSubmitted]) -> list[CaptionOutcome]:
        self.batches.append([j.job_id for j in jobs])
        return caption_batch(jobs, self.blobs.get_sync, self.captioner)


def delivery(job: ImageSubmitted, origin: object = None) -> Delivery:
    return Delivery(job.model_dump_json().encode(), origin)


async def test_handle_batch_moves_jobs_to_started_then_success(store: LocalBlobStore) -> None:
    jobs = [submit(store, "a", png((3, 4))), submit(store, "b", png((5, 6)))]
    states, sink, run = DictStore(), ListSink(), Runner(store)

    finals = await handle_batch(
        [delivery(jobs[0], "off-0"), delivery(jobs[1], "off-1")],
        store=states,
        sink=sink,
        run_captioning=run,
    )

    assert run.batches == [["a", "b"]]
    assert sink.summary() == [
        ("state", "a", "STARTED"),
        ("state", "b", "STARTED"),
        ("caption", "a", "caption.produced"),
        ("state", "a", "SUCCESS"),
        ("caption", "b", "caption.produced"),
        ("state", "b", "SUCCESS"),
    ]
    assert [s.caption for s in finals] == ["3x4", "5x6"]
    assert all(s.status is JobStatus.SUCCESS for s in finals)
    assert all(s.attempts == 1 for s in finals)
    assert all(s.started_at is not None and s.finished_at is not None for s in finals)
    assert all(s.submitted_at == T0 for s in finals)
    assert states.states == {"a": finals[0], "b": finals[1]}
    # every write carries the origin of its delivery, and the final write comes last
    assert [(s.job_id, s.status.value, o) for s, o in states.puts] == [
        ("a", "STARTED", "off-0"),
        ("b", "STARTED", "off-1"),
        ("a", "SUCCESS", "off-0"),
        ("b", "SUCCESS", "off-1"),
    ]
    published_finals = [item for kind, item in sink.log if kind == "state"][2:]
    assert published_finals == finals


async def test_handle_batch_records_failures(store: LocalBlobStore) -> None:
    good, bad = submit(store, "good", png((2, 2))), missing(store, "bad")
    states, sink, run = DictStore(), ListSink(), Runner(store)

    finals = await handle_batch(
        [delivery(good), delivery(bad)], store=states, sink=sink, run_captioning=run
    )

    assert [(s.job_id, s.status) for s in finals] == [
        ("good", JobStatus.SUCCESS),
        ("bad", JobStatus.FAILURE),
    ]
    assert finals[1].error is not None
    assert "not in the blob store" in finals[1].error
    assert finals[1].caption is None
    assert finals[1].finished_at is not None
    assert ("caption", "bad", "caption.failed") in sink.summary()


async def test_redelivered_terminal_job_is_skipped(store: LocalBlobStore) -> None:
    done, fresh = submit(store, "done", png((2, 2))), submit(store, "fresh", png((3, 3)))
    states, sink, run = DictStore(), ListSink(), Runner(store)
    finished = (
        JobState.pending("done", T0)
        .advance(JobStatus.STARTED)
        .advance(JobStatus.SUCCESS, caption="the original caption")
    )
    states.states["done"] = finished

    finals = await handle_batch(
        [delivery(done), delivery(fresh)], store=states, sink=sink, run_captioning=run
    )

    assert run.batches == [["fresh"]]
    assert [s.job_id for s in finals] == ["fresh"]
    assert states.states["done"] is finished
    assert all(job_id != "done" for _, job_id, _ in sink.summary())


async def test_only_terminal_redeliveries_means_no_captioning(store: LocalBlobStore) -> None:
    job = submit(store, "done", png((2, 2)))
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.states["done"] = JobState.pending("done", T0).advance(JobStatus.FAILURE, error="x")

    assert await handle_batch([delivery(job)], store=states, sink=sink, run_captioning=run) == []
    assert run.batches == []
    assert sink.log == []


async def test_redelivered_started_job_is_retried_with_another_attempt(
    store: LocalBlobStore,
) -> None:
    job = submit(store, "crashed", png((4, 4)))
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.states["crashed"] = JobState.pending("crashed", T0).advance(JobStatus.STARTED)

    [final] = await handle_batch([delivery(job)], store=states, sink=sink, run_captioning=run)

    assert final.status is JobStatus.SUCCESS
    assert final.attempts == 2
    assert run.batches == [["crashed"]]


async def test_malformed_deliveries_are_dropped(store: LocalBlobStore) -> None:
    good = submit(store, "good", png((2, 3)))
    wrong_type = JobState.pending("state", T0).model_dump_json().encode()
    states, sink, run = DictStore(), ListSink(), Runner(store)

    finals = await handle_batch(
        [Delivery(b"\x00garbage"), Delivery(b"{}"), Delivery(wrong_type), delivery(good)],
        store=states,
        sink=sink,
        run_captioning=run,
    )

    assert [s.job_id for s in finals] == ["good"]
    assert run.batches == [["good"]]
    assert set(states.states) == {"good"}


async def test_only_malformed_deliveries(store: LocalBlobStore) -> None:
    states, sink, run = DictStore(), ListSink(), Runner(store)
    assert (
        await handle_batch([Delivery(b"nope")], store=states, sink=sink, run_captioning=run) == []
    )
    assert run.batches == []
    [(dead, reason, attempts)] = sink.of("dead")
    assert dead.value == b"nope"
    assert "malformed" in reason
    assert attempts == 0
    assert sink.summary() == []
    assert states.puts == []


async def test_duplicate_job_in_one_batch_is_processed_once(store: LocalBlobStore) -> None:
    job, other = submit(store, "dup", png((6, 6))), submit(store, "other", png((7, 7)))
    states, sink, run = DictStore(), ListSink(), Runner(store)

    finals = await handle_batch(
        [delivery(job, 1), delivery(other, 2), delivery(job, 3)],
        store=states,
        sink=sink,
        run_captioning=run,
    )

    assert run.batches == [["dup", "other"]]
    assert [(s.job_id, s.attempts) for s in finals] == [("dup", 1), ("other", 1)]
    assert [kind for kind, job_id, _ in sink.summary() if job_id == "dup"] == [
        "state",
        "caption",
        "state",
    ]
    assert 3 not in [origin for _, origin in states.puts]


async def test_handle_batch_empty() -> None:
    async def never(jobs: list[ImageSubmitted]) -> list[CaptionOutcome]:
        raise AssertionError("must not be called")

    assert await handle_batch([], store=DictStore(), sink=ListSink(), run_captioning=never) == []


# --- retry policy ---------------------------------------------------------------------


class FlakyRunner(Runner):
    """The model fails (transiently) on its first `failures` calls."""

    def __init__(self, blobs: LocalBlobStore, failures: int) -> None:
        super().__init__(blobs, SizeCaptioner())
        self.failures = failures

    async def __call__(self, jobs: list[ImageSubmitted]) -> list[CaptionOutcome]:
        self.batches.append([j.job_id for j in jobs])
        if self.failures > 0:
            self.failures -= 1
            return [JobFailure(job, "CUDA out of memory", retriable=True) for job in jobs]
        return caption_batch(jobs, self.blobs.get_sync, self.captioner)


def test_backoff_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_s=0.5, backoff_max_s=3)
    assert [policy.delay_after(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


async def test_transient_failure_goes_to_retry_then_succeeds(store: LocalBlobStore) -> None:
    job = submit(store, "flaky", png((4, 5)))
    states, sink, run = DictStore(), ListSink(), FlakyRunner(store, failures=1)
    policy = RetryPolicy(max_attempts=3, backoff_s=2, backoff_max_s=10)

    before = datetime.now(UTC)
    [first] = await handle_batch(
        [delivery(job)], store=states, sink=sink, run_captioning=run, policy=policy
    )
    assert first.status is JobStatus.RETRY
    assert first.attempts == 1
    assert first.error == "CUDA out of memory"
    [(retried, not_before)] = sink.of("retry")
    assert retried.value == delivery(job).value
    assert before + timedelta(seconds=2) <= not_before <= datetime.now(UTC) + timedelta(seconds=2)
    assert sink.of("caption") == [], "no result event while the job is being retried"

    # The retry topic hands the same event back; the second attempt succeeds.
    [second] = await handle_batch(
        [retried], store=states, sink=sink, run_captioning=run, policy=policy
    )
    assert second.status is JobStatus.SUCCESS
    assert second.attempts == 2
    assert second.error is None
    assert [s.status.value for s in sink.of("state")] == ["STARTED", "RETRY", "STARTED", "SUCCESS"]
    assert sink.of("dead") == []


async def test_transient_failures_end_in_failure_and_dead_letter_after_max_attempts(
    store: LocalBlobStore,
) -> None:
    job = submit(store, "doomed", png((4, 5)))
    states, sink, run = DictStore(), ListSink(), FlakyRunner(store, failures=99)
    policy = RetryPolicy(max_attempts=3, backoff_s=0, backoff_max_s=0)

    statuses = []
    for _ in range(3):
        [state] = await handle_batch(
            [delivery(job)], store=states, sink=sink, run_captioning=run, policy=policy
        )
        statuses.append((state.status, state.attempts))

    assert statuses == [(JobStatus.RETRY, 1), (JobStatus.RETRY, 2), (JobStatus.FAILURE, 3)]
    final = states.states["doomed"]
    assert final.error is not None
    assert "CUDA out of memory" in final.error
    assert "3 attempts" in final.error
    [failed] = sink.of("caption")
    assert isinstance(failed, CaptionFailed)
    assert failed.event_id == caption_event_id("doomed", job.submitted_at)
    [(dead, reason, attempts)] = sink.of("dead")
    assert dead.value == delivery(job).value
    assert attempts == 3
    assert "CUDA out of memory" in reason
    # A later redelivery of the original event changes nothing.
    assert await handle_batch([delivery(job)], store=states, sink=sink, run_captioning=run) == []


async def test_permanent_failure_is_not_retried(store: LocalBlobStore) -> None:
    job = missing(store, "gone")
    states, sink, run = DictStore(), ListSink(), Runner(store)

    [final] = await handle_batch([delivery(job)], store=states, sink=sink, run_captioning=run)

    assert final.status is JobStatus.FAILURE
    assert final.attempts == 1
    assert sink.of("retry") == []
    [(_, reason, attempts)] = sink.of("dead")
    assert "not in the blob store" in reason
    assert attempts == 1


async def test_malformed_deliveries_are_dead_lettered_verbatim(store: LocalBlobStore) -> None:
    garbage = [Delivery(b"\x00garbage", key=b"k1"), Delivery(None, key=b"k2"), Delivery(b"{}")]
    states, sink, run = DictStore(), ListSink(), Runner(store)

    await handle_batch(garbage, store=states, sink=sink, run_captioning=run)

    assert [d for d, _, _ in sink.of("dead")] == garbage
    assert all("malformed" in reason for _, reason, _ in sink.of("dead"))


# --- cancellation ---------------------------------------------------------------------


async def test_cancelled_job_fails_without_running_the_model(store: LocalBlobStore) -> None:
    kept, dropped = submit(store, "kept", png((3, 3))), submit(store, "dropped", png((4, 4)))
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.cancelled.add("dropped")

    finals = await handle_batch(
        [delivery(kept), delivery(dropped)], store=states, sink=sink, run_captioning=run
    )

    assert run.batches == [["kept"]], "the cancelled job never reaches the model"
    by_id = {s.job_id: s for s in finals}
    assert by_id["kept"].status is JobStatus.SUCCESS
    assert by_id["dropped"].status is JobStatus.FAILURE
    assert by_id["dropped"].attempts == 0
    assert "cancelled" in (by_id["dropped"].error or "")
    assert ("caption", "dropped", "caption.failed") in sink.summary()
    assert sink.of("dead") == [], "a cancellation is not a dead letter"


async def test_cancellation_after_the_job_started_is_ignored(store: LocalBlobStore) -> None:
    job = submit(store, "busy", png((5, 5)))
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.states["busy"] = JobState.pending("busy", T0).advance(JobStatus.STARTED)
    states.cancelled.add("busy")

    [final] = await handle_batch([delivery(job)], store=states, sink=sink, run_captioning=run)

    assert final.status is JobStatus.SUCCESS
    assert final.attempts == 2


async def test_conflicting_submission_under_one_job_id_is_dead_lettered(
    store: LocalBlobStore,
) -> None:
    """Two replicas raced on one Idempotency-Key with different images: the job id is the
    key's, so the first event on the log owns the job and the other is parked."""
    first = submit(store, "k", png((2, 2))).model_copy(update={"request_digest": "d1"})
    other = submit(store, "k", png((3, 3))).model_copy(update={"request_digest": "d2"})
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.states["k"] = JobState.submitted(first).advance(JobStatus.STARTED)
    in_retry = states.states["k"].advance(JobStatus.RETRY, error="transient")
    states.states["k"] = in_retry

    finals = await handle_batch([delivery(other)], store=states, sink=sink, run_captioning=run)

    assert finals == []
    assert run.batches == []
    [(parked, reason, attempts)] = sink.of("dead")
    assert parked.value == delivery(other).value
    assert "Idempotency-Key" in reason
    assert attempts == 0
    assert states.states["k"] is in_retry, "the first request's job is untouched"


async def test_a_job_id_reused_after_its_job_finished_is_a_new_job(store: LocalBlobStore) -> None:
    """An Idempotency-Key reused after its job expired gives the same job id again; an
    event submitted after the stored state finished is that new job, not a redelivery."""
    old = JobState.pending("k", T0).advance(JobStatus.FAILURE, error="long ago")
    old = old.model_copy(update={"finished_at": T0 + timedelta(hours=1)})
    again = submit(store, "k", png((4, 4))).model_copy(
        update={"submitted_at": T0 + timedelta(days=2)}
    )
    states, sink, run = DictStore(), ListSink(), Runner(store)
    states.states["k"] = old

    [final] = await handle_batch([delivery(again)], store=states, sink=sink, run_captioning=run)

    assert final.status is JobStatus.SUCCESS
    assert final.caption == "4x4"
    assert final.attempts == 1
    assert final.submitted_at == again.submitted_at
