"""Event and API contracts: round trips, strict decoding, job state transitions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import BaseModel

from captionstream.schemas import jsonschema
from captionstream.schemas.api import JobResult, JobStatusResponse
from captionstream.schemas.events import (
    CaptionFailed,
    CaptionProduced,
    EventDecodeError,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    caption_event_id,
    decode_caption_event,
    decode_image_submitted,
    decode_job_state,
)
from captionstream.schemas.topics import TOPICS

Decoder = Callable[[bytes | str], BaseModel]

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32


def image_submitted(**changes: object) -> ImageSubmitted:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "image_ref": "file:///data/blobs/ab/" + SHA + ".png",
        "content_type": "image/png",
        "size_bytes": 1234,
        "width": 64,
        "height": 48,
        "sha256": SHA,
        "submitted_at": T0,
        "options": GenerationOptions(max_new_tokens=12, num_beams=2, prompt="a photo of"),
    }
    fields.update(changes)
    return ImageSubmitted.model_validate(fields)


def caption_produced() -> CaptionProduced:
    return CaptionProduced(
        event_id=caption_event_id("job-1", T0),
        job_id="job-1",
        image_ref="file:///data/blobs/ab/x.png",
        sha256=SHA,
        caption="a cat on a mat",
        model="tiny-blip",
        submitted_at=T0,
        produced_at=T0 + timedelta(seconds=2),
    )


def caption_failed() -> CaptionFailed:
    return CaptionFailed(
        event_id=caption_event_id("job-2", T0),
        job_id="job-2",
        image_ref="file:///data/blobs/cd/y.png",
        error="cannot decode image",
        submitted_at=T0,
        failed_at=T0 + timedelta(seconds=3),
    )


def job_state() -> JobState:
    return JobState(
        job_id="job-1",
        status=JobStatus.SUCCESS,
        attempts=2,
        submitted_at=T0,
        updated_at=T0 + timedelta(seconds=5),
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=5),
        caption="a dog",
    )


# --- round trips ----------------------------------------------------------------------


def test_image_submitted_round_trip() -> None:
    event = image_submitted()
    raw = event.model_dump_json()
    assert json.loads(raw)["type"] == "image.submitted"
    assert json.loads(raw)["schema_version"] == 1
    decoded = decode_image_submitted(raw.encode())
    assert decoded == event
    assert decoded.options.prompt == "a photo of"
    assert decoded.submitted_at == T0


def test_job_state_round_trip() -> None:
    state = job_state()
    decoded = decode_job_state(state.model_dump_json().encode())
    assert decoded == state
    assert decoded.status is JobStatus.SUCCESS


@pytest.mark.parametrize("event", [caption_produced(), caption_failed()], ids=lambda e: e.type)
def test_caption_event_round_trip_keeps_the_concrete_type(
    event: CaptionProduced | CaptionFailed,
) -> None:
    decoded = decode_caption_event(event.model_dump_json())
    assert type(decoded) is type(event)
    assert decoded == event


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = json.loads(image_submitted().model_dump_json())
    payload["added_in_a_later_minor_version"] = 42
    assert decode_image_submitted(json.dumps(payload)) == image_submitted()


# --- strict decoding ------------------------------------------------------------------


DECODERS = [decode_image_submitted, decode_job_state, decode_caption_event]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "raw",
    [b"", b"not json at all", b"\xff\xfe\x00", b"[1, 2, 3]", b"{}", b'{"type": null}'],
    ids=["empty", "text", "binary", "array", "empty-object", "null-type"],
)
def test_garbage_raises_event_decode_error(decode: Decoder, raw: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode(raw)


@pytest.mark.parametrize(
    ("decode", "event"),
    [
        (decode_image_submitted, image_submitted()),
        (decode_job_state, job_state()),
        (decode_caption_event, caption_produced()),
        (decode_caption_event, caption_failed()),
    ],
    ids=["image.submitted", "job.state", "caption.produced", "caption.failed"],
)
@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_raises(decode: Decoder, event: BaseModel, version: object) -> None:
    payload = json.loads(event.model_dump_json())
    payload["schema_version"] = version
    with pytest.raises(EventDecodeError, match=r"v1"):
        decode(json.dumps(payload))


@pytest.mark.parametrize(
    ("decode", "event"),
    [
        (decode_image_submitted, job_state()),
        (decode_job_state, image_submitted()),
        (decode_image_submitted, caption_produced()),
        (decode_caption_event, job_state()),
        (decode_caption_event, image_submitted()),
    ],
    ids=[
        "state-as-image",
        "image-as-state",
        "caption-as-image",
        "state-as-caption",
        "image-as-caption",
    ],
)
def test_event_of_another_type_raises(decode: Decoder, event: BaseModel) -> None:
    with pytest.raises(EventDecodeError):
        decode(event.model_dump_json())


def test_unknown_type_value_raises() -> None:
    payload = json.loads(caption_produced().model_dump_json())
    payload["type"] = "caption.deleted"
    with pytest.raises(EventDecodeError):
        decode_caption_event(json.dumps(payload))


def test_invalid_field_values_raise() -> None:
    payload = json.loads(image_submitted().model_dump_json())
    payload["sha256"] = "NOT-A-HASH"
    with pytest.raises(EventDecodeError):
        decode_image_submitted(json.dumps(payload))
    payload = json.loads(image_submitted().model_dump_json())
    payload["options"]["num_beams"] = 99
    with pytest.raises(EventDecodeError):
        decode_image_submitted(json.dumps(payload))


def test_event_decode_error_is_a_value_error() -> None:
    assert issubclass(EventDecodeError, ValueError)


def test_events_are_frozen() -> None:
    event = image_submitted()
    with pytest.raises(ValueError, match="frozen"):
        event.job_id = "other"  # type: ignore[misc]


# --- job state ------------------------------------------------------------------------


def test_job_status_terminal() -> None:
    assert {s for s in JobStatus if s.terminal} == {JobStatus.SUCCESS, JobStatus.FAILURE}
    assert not JobStatus.PENDING.terminal
    assert not JobStatus.STARTED.terminal
    assert not JobStatus.RETRY.terminal


def test_pending_state() -> None:
    state = JobState.pending("job-9", T0)
    assert state.status is JobStatus.PENDING
    assert state.attempts == 0
    assert state.submitted_at == state.updated_at == T0
    assert state.started_at is None
    assert state.finished_at is None


def test_advance_to_started_increments_attempts_and_sets_started_at() -> None:
    pending = JobState.pending("job-9", T0)
    started = pending.advance(JobStatus.STARTED)
    assert started.status is JobStatus.STARTED
    assert started.attempts == 1
    assert started.started_at is not None
    assert started.started_at > T0
    assert started.updated_at == started.started_at
    assert started.finished_at is None
    # the original is untouched (events are immutable)
    assert pending.status is JobStatus.PENDING
    assert pending.attempts == 0

    again = started.advance(JobStatus.RETRY).advance(JobStatus.STARTED)
    assert again.attempts == 2


def test_advance_to_non_started_keeps_attempts() -> None:
    started = JobState.pending("job-9", T0).advance(JobStatus.STARTED)
    retry = started.advance(JobStatus.RETRY, error="broker hiccup")
    assert retry.attempts == 1
    assert retry.error == "broker hiccup"
    assert retry.finished_at is None


@pytest.mark.parametrize("status", [JobStatus.SUCCESS, JobStatus.FAILURE])
def test_advance_to_terminal_sets_finished_at(status: JobStatus) -> None:
    started = JobState.pending("job-9", T0).advance(JobStatus.STARTED)
    final = started.advance(status, caption="x" if status is JobStatus.SUCCESS else None)
    assert final.status is status
    assert final.finished_at is not None
    assert final.finished_at >= started.updated_at
    assert final.updated_at == final.finished_at
    assert final.attempts == started.attempts
    assert final.started_at == started.started_at


def test_advance_explicit_changes_win() -> None:
    stamp = T0 + timedelta(hours=1)
    final = JobState.pending("job-9", T0).advance(JobStatus.SUCCESS, finished_at=stamp, caption="c")
    assert final.finished_at == stamp
    assert final.caption == "c"


def test_caption_event_id_is_deterministic_per_job() -> None:
    assert caption_event_id("job-1", T0) == caption_event_id("job-1", T0)
    assert caption_event_id("job-1", T0) != caption_event_id("job-2", T0)
    assert caption_event_id("job-1", T0) != "job-1"
    # The same instant in another zone, as a decoder may hand it over: the same job.
    in_paris = T0.astimezone(timezone(timedelta(hours=1)))
    assert caption_event_id("job-1", in_paris) == caption_event_id("job-1", T0)


def test_a_new_job_under_a_reused_id_gets_a_new_caption_event_id() -> None:
    """An Idempotency-Key sent again after its job expired makes the same job id: the new
    job's caption must not look like a duplicate of the old one to a consumer dropping
    repeats by event id."""
    later = T0 + timedelta(days=2)
    assert caption_event_id("job-1", later) != caption_event_id("job-1", T0)


def test_a_caption_event_id_survives_the_events_json_round_trip() -> None:
    """Workers and gateways derive it from the decoded event or state: the same id."""
    event = decode_caption_event(caption_produced().model_dump_json())
    assert event.event_id == caption_event_id(event.job_id, event.submitted_at)


def test_job_status_response_from_state_puts_caption_in_result() -> None:
    state = job_state()
    response = JobStatusResponse.from_state(state)
    assert response.job_id == "job-1"
    assert response.status is JobStatus.SUCCESS
    assert response.result == JobResult(caption="a dog")
    assert response.error is None
    assert response.attempts == 2
    assert response.submitted_at == state.submitted_at
    assert response.updated_at == state.updated_at
    assert json.loads(response.model_dump_json())["result"] == {"caption": "a dog"}


def test_job_status_response_without_caption_has_no_result() -> None:
    state = JobState.pending("job-3", T0).advance(JobStatus.FAILURE, error="bad image")
    response = JobStatusResponse.from_state(state)
    assert response.result is None
    assert response.error == "bad image"
    assert response.status is JobStatus.FAILURE


def test_topics_are_versioned_and_only_job_state_is_compacted() -> None:
    names = [spec.name for spec in TOPICS.all()]
    assert len(set(names)) == len(names), "topic names are distinct"
    assert all(name.endswith(".v1") for name in names)
    assert [spec for spec in TOPICS.all() if spec.compacted] == [TOPICS.job_state]


# --- committed JSON Schema files --------------------------------------------------------


def test_committed_json_schemas_are_up_to_date() -> None:
    rendered = jsonschema.render()
    assert set(rendered) == {f"{name}.schema.json" for name in jsonschema.PUBLIC_EVENTS}
    for name, text in rendered.items():
        path = jsonschema.SCHEMA_DIR / name
        assert path.exists(), f"{path} is missing; run `make schemas`"
        assert path.read_text() == text, f"{path} is stale; run `make schemas`"


def test_no_stray_json_schema_files() -> None:
    committed = {p.name for p in jsonschema.SCHEMA_DIR.glob("*.json")}
    assert committed == set(jsonschema.render()), "stray schema files; run `make schemas`"


def test_json_schema_requires_the_event_type() -> None:
    schema = json.loads(jsonschema.render()["caption.produced.v1.schema.json"])
    assert schema["$id"] == "captionstream/caption.produced.v1.schema.json"
    assert schema["properties"]["type"]["const"] == "caption.produced"


def test_job_control_requests_decode_by_type() -> None:
    from captionstream.schemas.events import JobCancelRequested, JobExpiryDue, decode_job_control

    cancel = JobCancelRequested(job_id="j1", requested_at=T0)
    expire = JobExpiryDue(job_id="j2", image_ref="file:///x.png", due_at=T0)
    assert decode_job_control(cancel.model_dump_json()) == cancel
    assert decode_job_control(expire.model_dump_json()) == expire
    with pytest.raises(EventDecodeError):
        decode_job_control(b'{"type": "job.reboot", "job_id": "j3"}')
    with pytest.raises(EventDecodeError):
        decode_job_control(None)
