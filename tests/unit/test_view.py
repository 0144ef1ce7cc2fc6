"""The gateway's job view: first terminal state is final, subscribers get every change."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from captionstream.gateway.view import JobView
from captionstream.schemas.events import JobState, JobStatus, utcnow

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def pending(job_id: str = "job-1") -> JobState:
    return JobState.pending(job_id, T0)


def started(job_id: str = "job-1") -> JobState:
    return pending(job_id).advance(JobStatus.STARTED)


def success(job_id: str = "job-1", caption: str = "a cat") -> JobState:
    return started(job_id).advance(JobStatus.SUCCESS, caption=caption)


def failure(job_id: str = "job-1") -> JobState:
    return started(job_id).advance(JobStatus.FAILURE, error="bad image")


def test_apply_records_new_states() -> None:
    view = JobView()
    assert len(view) == 0
    assert view.get("job-1") is None
    first = pending()
    assert view.apply(first) is True
    assert view.get("job-1") == first
    second = started()
    assert view.apply(second) is True
    assert view.get("job-1") == second
    assert view.apply(pending("job-2")) is True
    assert len(view) == 2


def test_identical_state_is_not_a_change() -> None:
    view = JobView()
    state = started()
    assert view.apply(state) is True
    assert view.apply(state.model_copy()) is False
    assert view.get("job-1") == state


def test_non_terminal_state_after_terminal_is_ignored() -> None:
    view = JobView()
    final = success()
    assert view.apply(final) is True
    # a redelivery moves the job to STARTED again (with a later timestamp): ignored
    redelivered = final.advance(JobStatus.STARTED)
    assert view.apply(redelivered) is False
    assert view.apply(pending()) is False
    assert view.get("job-1") == final


def test_second_different_terminal_state_is_ignored() -> None:
    view = JobView()
    final = success(caption="first caption")
    assert view.apply(final) is True
    assert view.apply(success(caption="second caption")) is False
    assert view.apply(failure()) is False
    assert view.get("job-1") == final


def test_terminal_state_of_one_job_does_not_freeze_another() -> None:
    view = JobView()
    view.apply(success("job-1"))
    assert view.apply(started("job-2")) is True
    assert view.apply(failure("job-2")) is True
    state = view.get("job-2")
    assert state is not None
    assert state.status is JobStatus.FAILURE


def test_supersedes() -> None:
    assert pending().supersedes(None)
    assert started().supersedes(pending())
    assert success().supersedes(started())
    assert not started().supersedes(success())
    assert not success(caption="other").supersedes(success())


async def test_subscriber_receives_every_change() -> None:
    view = JobView()
    with view.subscribe("job-1") as queue:
        assert queue.empty()
        s1, s2 = started(), success()
        view.apply(s1)
        view.apply(s1)  # no change: not pushed
        view.apply(pending("job-2"))  # another job: not pushed
        view.apply(s2)
        view.apply(failure())  # ignored after terminal: not pushed
        assert await asyncio.wait_for(queue.get(), 1) == s1
        assert await asyncio.wait_for(queue.get(), 1) == s2
        assert queue.empty()


async def test_several_subscribers_of_one_job() -> None:
    view = JobView()
    with view.subscribe("job-1") as q1, view.subscribe("job-1") as q2:
        assert q1 is not q2
        state = started()
        view.apply(state)
        assert q1.get_nowait() is state
        assert q2.get_nowait() is state


async def test_unsubscribes_on_exit() -> None:
    view = JobView()
    with view.subscribe("job-1") as queue:
        assert "job-1" in view._subscribers
    assert "job-1" not in view._subscribers
    view.apply(started())
    assert queue.empty()


async def test_unsubscribes_on_exception_and_keeps_other_subscribers() -> None:
    view = JobView()
    with view.subscribe("job-1") as keeper:
        with pytest.raises(RuntimeError), view.subscribe("job-1") as leaver:
            raise RuntimeError("client went away")
        assert view._subscribers["job-1"] == {keeper}
        view.apply(started())
        assert leaver.empty()
        assert keeper.qsize() == 1
    assert "job-1" not in view._subscribers


def test_pending_published_late_never_replaces_progress() -> None:
    """The gateway writes PENDING after the image event, so the processor's STARTED can
    land first: PENDING must not take the job back."""
    view = JobView()
    view.apply(started())
    assert view.apply(pending()) is False
    state = view.get("job-1")
    assert state is not None
    assert state.status is JobStatus.STARTED
    assert view.apply(success()) is True


def test_forget_drops_the_job_and_its_indexes() -> None:
    view = JobView()
    done = success().model_copy(
        update={"idempotency_key": "k1", "cache_key": "c1", "model": "blip"}
    )
    view.apply(done)
    assert view.find_by_idempotency_key("k1") == done
    assert view.find_cached("c1") == done
    view.forget("job-1")
    assert view.get("job-1") is None
    assert view.find_by_idempotency_key("k1") is None
    assert view.find_cached("c1") is None
    assert view.count_by_status()[JobStatus.SUCCESS] == 0
    view.forget("job-1")  # twice is harmless


def captioned(
    job_id: str, model: str, minutes: int, cache_key: str = "c1", cached_from: str | None = None
) -> JobState:
    """A SUCCESS state made by `model`, finished `minutes` after T0."""
    at = T0 + timedelta(minutes=minutes)
    return success(job_id).model_copy(
        update={
            "cache_key": cache_key,
            "model": model,
            "cached_from": cached_from,
            "updated_at": at,
            "finished_at": at,
        }
    )


def test_cache_serves_only_captions_of_the_current_model() -> None:
    view = JobView()
    view.apply(captioned("old", "blip-base", minutes=1))
    assert view.find_cached("c1") == view.get("old")
    # the deployment moved to another model: its newest caption (of another image) says so
    view.apply(captioned("other", "blip-large", minutes=2, cache_key="c2"))
    assert view.find_cached("c1") is None, "a caption of the old model is not reused"
    assert view.find_cached("c2") == view.get("other")
    # the same image captioned again by the new model becomes the entry for its key
    view.apply(captioned("again", "blip-large", minutes=3))
    assert view.find_cached("c1") == view.get("again")


def test_current_model_does_not_depend_on_replay_order() -> None:
    """A restarted gateway replays partitions in any order: the newest caption decides."""
    states = [
        captioned("old", "blip-base", minutes=1),
        captioned("new", "blip-large", minutes=2, cache_key="c2"),
    ]
    for order in (states, states[::-1]):
        view = JobView()
        for state in order:
            view.apply(state)
        assert view.find_cached("c1") is None
        assert view.find_cached("c2") is not None


def test_cache_hits_do_not_count_as_the_current_model() -> None:
    """Only captions a processor made tell which model runs now, not replies from the
    cache (which repeat whatever model made the entry)."""
    view = JobView()
    view.apply(captioned("made", "blip-large", minutes=1, cache_key="c2"))
    view.apply(captioned("hit", "blip-base", minutes=5, cache_key="c9", cached_from="x"))
    assert view.find_cached("c2") == view.get("made")


def test_expired_lists_only_jobs_finished_before_the_cutoff() -> None:
    view = JobView()
    view.apply(success("old"))
    view.apply(started("running"))
    finished = view.get("old")
    assert finished is not None
    assert finished.finished_at is not None
    assert [s.job_id for s in view.expired(finished.finished_at)] == []
    later = finished.finished_at + timedelta(seconds=1)
    assert [s.job_id for s in view.expired(later)] == ["old"]


def test_a_job_submitted_after_the_old_one_finished_replaces_it() -> None:
    """The same job id again (an Idempotency-Key reused after its job expired) is a new
    job, not a state to ignore after the first terminal one."""
    view = JobView()
    view.apply(failure())
    finished = view.get("job-1")
    assert finished is not None
    assert finished.finished_at is not None
    reborn = JobState.pending("job-1", finished.finished_at + timedelta(seconds=1))
    assert view.apply(reborn) is True
    assert view.get("job-1") == reborn
    late = success().model_copy(update={"finished_at": finished.finished_at})
    assert view.apply(late) is False, "a state of the old job does not replace it"
    assert view.apply(reborn.advance(JobStatus.STARTED)) is True


def test_replicas_racing_on_one_job_id_do_not_block_its_result() -> None:
    """Two replicas publish PENDING for one key-derived job id with their own clocks;
    the job's result still lands, whichever PENDING came first."""
    view = JobView()
    first = JobState.pending("job-1", T0)
    second = JobState.pending("job-1", T0 + timedelta(milliseconds=5))
    for state in (second, first):
        view.apply(state)
    done = first.advance(JobStatus.STARTED).advance(JobStatus.SUCCESS, caption="a cat")
    assert view.apply(done) is True
    assert view.get("job-1") == done


async def test_followers_of_a_job_end_when_it_expires() -> None:
    view = JobView()
    view.apply(JobState.pending("job-x", utcnow()))
    followed: list[str] = []

    async def follow() -> None:
        async for state in view.follow("job-x"):
            followed.append(state.status.value)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    view.forget("job-x")
    await asyncio.wait_for(task, 1)  # ended, not waiting for a change that never comes
    assert followed == ["PENDING"]
