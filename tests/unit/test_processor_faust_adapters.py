"""The processor's ports on Faust (processor.faust_adapters) with dicts and fake topics:
which event a table access runs under, what each send carries, when a retry is due."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import pytest

from captionstream.processor.faust_adapters import ControlRequestSender, TableStateStore, TopicSink
from captionstream.processor.pipeline import Delivery, seconds_until_due
from captionstream.schemas.events import JobState, JobStatus, decode_job_state
from captionstream.schemas.topics import TOPICS, Headers

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class Origin:
    """Stands in for a Faust event."""


class EventRecordingTable(dict[bytes, bytes]):
    """A dict that records Faust's current event at each access, as a Faust table
    would use it to pick the partition."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, Any]] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        self.seen.append(("get", faust.current_event()))
        return super().get(key, default)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.seen.append(("set", faust.current_event()))
        super().__setitem__(key, value)


def test_every_table_access_runs_under_its_own_jobs_event() -> None:
    jobs, cancelled = EventRecordingTable(), EventRecordingTable()
    store = TableStateStore(jobs, cancelled)
    first, second = Origin(), Origin()
    state = JobState.pending("a", NOW).advance(JobStatus.STARTED)

    store.put(state, first)
    assert store.get("a", second) == state
    assert store.get("b", first) is None
    assert store.is_cancelled("a", second) is False
    cancelled[b"a"] = b"asked"
    assert store.is_cancelled("a", first) is True

    assert jobs.seen == [("set", first), ("get", second), ("get", first)]
    assert cancelled.seen == [("get", second), ("set", None), ("get", first)]
    assert decode_job_state(jobs[b"a"]) == state
    assert faust.current_event() is None, "no event left behind after an access"


class FakeTopic:
    """Records sends; each is acknowledged a moment later, as by a broker."""

    def __init__(self, name: str = "t") -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []
        self.acks: list[asyncio.Future[None]] = []

    async def send(self, **record: Any) -> asyncio.Future[None]:
        self.sent.append(record)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, ack.set_result, None)
        self.acks.append(ack)
        return ack

    @property
    def all_acked(self) -> bool:
        return all(ack.done() for ack in self.acks)

    def get_topic_name(self) -> str:
        return self.name


def sink_on(topics: dict[str, FakeTopic], dead: list[int]) -> TopicSink:
    return TopicSink(
        captions=topics["captions"],  # type: ignore[arg-type]
        job_state=topics["job_state"],  # type: ignore[arg-type]
        retries=topics["retries"],  # type: ignore[arg-type]
        dead_letters=topics["dead_letters"],  # type: ignore[arg-type]
        on_dead_letter=lambda: dead.append(1),
    )


async def test_a_scheduled_retry_is_due_when_its_header_says() -> None:
    topics = {name: FakeTopic() for name in ("captions", "job_state", "retries", "dead_letters")}
    sink = sink_on(topics, [])
    delivery = Delivery(value=b"event", key=b"job")

    await sink.schedule_retry(delivery, NOW + timedelta(seconds=7.5))

    [record] = topics["retries"].sent
    assert (record["key"], record["value"]) == (b"job", b"event")
    assert topics["retries"].all_acked, "the send was awaited until acknowledged"
    assert seconds_until_due(record["headers"], NOW) == 7.5
    assert seconds_until_due(record["headers"], NOW + timedelta(seconds=60)) == 0.0


@pytest.mark.parametrize(
    "headers", [{}, {Headers.NOT_BEFORE: b"not a time"}, {Headers.NOT_BEFORE: b""}]
)
def test_a_retry_without_a_readable_due_time_is_due_now(headers: dict[str, bytes]) -> None:
    assert seconds_until_due(headers, NOW) == 0.0


async def test_dead_letters_carry_why_and_count_and_forget_is_a_tombstone() -> None:
    topics = {name: FakeTopic() for name in ("captions", "job_state", "retries", "dead_letters")}
    dead: list[int] = []
    sink = sink_on(topics, dead)

    await sink.dead_letter(Delivery(value=b"raw", key=b"k"), "bad image", attempts=3)
    await sink.forget("job-1")

    [parked] = topics["dead_letters"].sent
    assert parked["value"] == b"raw"
    assert parked["headers"][Headers.REASON] == b"bad image"
    assert parked["headers"][Headers.ATTEMPTS] == b"3"
    assert parked["headers"][Headers.SOURCE_TOPIC] == TOPICS.images.name.encode()
    assert dead == [1]
    assert topics["dead_letters"].all_acked
    assert topics["job_state"].all_acked
    assert topics["job_state"].sent == [{"key": b"job-1", "value": None, "headers": None}]


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    async def send_and_wait(self, *args: Any) -> None:
        self.sent.append(args)


@pytest.mark.parametrize("exactly_once", [False, True])
async def test_janitor_requests_bypass_transactions_only_under_exactly_once(
    exactly_once: bool,
) -> None:
    control = FakeTopic("captionstream.control")
    app: Any = type("App", (), {"producer": FakeProducer()})()
    send = ControlRequestSender(app, control, exactly_once=exactly_once)  # type: ignore[arg-type]

    await send(b"job", b"request")

    if exactly_once:
        assert app.producer.sent == [
            ("captionstream.control", b"job", b"request", None, None, None)
        ]
        assert control.sent == []
    else:
        assert control.sent == [{"key": b"job", "value": b"request"}]
        assert app.producer.sent == []
