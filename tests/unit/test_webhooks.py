"""Webhooks without Kafka: signing, the retry policy, the payload, offset bookkeeping, which
terminal states are delivered, the URL guard, and the sender against a real local HTTP
receiver (sleeps recorded, not slept)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiokafka import TopicPartition
from pydantic import SecretStr

from captionstream.errors import WebhookRefused
from captionstream.gateway.idempotency import request_digest
from captionstream.gateway.metrics import GatewayMetrics
from captionstream.gateway.view import JobView
from captionstream.gateway.webhooks import (
    FinishedJobs,
    OffsetTracker,
    PartitionOffsets,
    Verdict,
    WebhookDispatcher,
    WebhookGuard,
    WebhookSender,
    backoff_delay,
    classify,
    parse_retry_after,
    retry_delay,
)
from captionstream.ingest.address_guard import IPAddress
from captionstream.kafka import KafkaConnection
from captionstream.schemas.events import GenerationOptions, JobState, JobStatus, caption_event_id
from captionstream.schemas.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    JobFinishedWebhook,
    sign,
    verify_signature,
)
from captionstream.settings import GatewaySettings

SECRET = "whsec-test"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

# --- signing --------------------------------------------------------------------------


def test_a_signature_verifies_and_is_stripe_shaped() -> None:
    body = b'{"job_id": "j1"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    assert v1.startswith("v1=")
    assert len(v1) == 3 + 64
    assert verify_signature(SECRET, header, body, now=1_700_000_010)


def test_a_tampered_body_or_another_secret_fails() -> None:
    body = b'{"status": "SUCCESS"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    now = 1_700_000_000
    assert not verify_signature(SECRET, header, b'{"status": "FAILURE"}', now=now)
    assert not verify_signature("another-secret", header, body, now=now)
    forged_time = header.replace("t=1700000000", "t=1700000001")
    assert not verify_signature(SECRET, forged_time, body, now=now)


def test_an_old_or_future_timestamp_fails() -> None:
    body = b"{}"
    header = sign(SECRET, body, timestamp=1_700_000_000)
    assert verify_signature(SECRET, header, body, tolerance_s=300, now=1_700_000_300)
    assert not verify_signature(SECRET, header, body, tolerance_s=300, now=1_700_000_301)
    assert not verify_signature(SECRET, header, body, tolerance_s=300, now=1_699_999_699)


@pytest.mark.parametrize(
    "header",
    [None, "", "v1=abc", "t=1700000000", "t=x,v1=abc", "garbage", "t=1700000000,v1="],
)
def test_malformed_headers_fail(header: str | None) -> None:
    assert not verify_signature(SECRET, header, b"{}", now=1_700_000_000)


def test_one_matching_v1_among_several_suffices() -> None:
    """Secret rotation: a header may carry several signatures."""
    body = b"{}"
    good = sign(SECRET, body, timestamp=1_700_000_000)
    header = good.replace("v1=", "v1=" + "0" * 64 + ",v1=")
    assert verify_signature(SECRET, header, body, now=1_700_000_000)


# --- retry policy ---------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_all() -> None:
    top = [backoff_delay(n, 1.0, 30.0, rng=lambda: 1.0) for n in range(1, 8)]
    assert top == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    low = [backoff_delay(n, 1.0, 30.0, rng=lambda: 0.0) for n in range(1, 8)]
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert backoff_delay(10_000, 1.0, 30.0, rng=lambda: 1.0) == 30.0  # no overflow
    with pytest.raises(ValueError, match="failures >= 1"):
        backoff_delay(0, 1.0, 30.0)


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    assert retry_delay(1, 7.0, 1.0, 30.0, rng=lambda: 1.0) == 7.0
    assert retry_delay(1, 3600.0, 1.0, 30.0, rng=lambda: 1.0) == 30.0
    assert retry_delay(3, 0.0, 1.0, 30.0, rng=lambda: 1.0) == 4.0  # never shorter than backoff
    assert retry_delay(1, None, 1.0, 30.0, rng=lambda: 1.0) == 1.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = "Wed, 01 Jan 2025 12:00:10 GMT"
    assert parse_retry_after(date, now=T0) == 10.0
    assert parse_retry_after(date, now=T0 + timedelta(minutes=1)) == 0.0


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (None, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (429, Verdict.RETRY),
        (408, Verdict.RETRY),
        (400, Verdict.REJECTED),
        (404, Verdict.REJECTED),
        (410, Verdict.REJECTED),
        (301, Verdict.REJECTED),  # redirects are not followed (SSRF)
    ],
)
def test_which_answers_are_retried(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


# --- payload --------------------------------------------------------------------------


def finished(status: JobStatus = JobStatus.SUCCESS, **changes: object) -> JobState:
    state = JobState.pending("job-1", T0).model_copy(
        update={"webhook_url": "http://127.0.0.1/hook"}
    )
    state = state.advance(JobStatus.STARTED)
    if status is JobStatus.SUCCESS:
        return state.advance(status, caption="a red square", model="tiny-blip", **changes)
    return state.advance(status, error="image missing", **changes)


def test_payload_of_a_success_and_a_failure() -> None:
    ok = JobFinishedWebhook.from_state(finished())
    assert ok.type == "job.finished"
    assert ok.event_id == caption_event_id("job-1", T0), "stable: the caption event's id"
    assert (ok.status, ok.caption, ok.error, ok.attempts) == (
        JobStatus.SUCCESS,
        "a red square",
        None,
        1,
    )
    assert ok.submitted_at == T0
    assert ok.finished_at >= T0
    failed = JobFinishedWebhook.from_state(finished(JobStatus.FAILURE))
    assert (failed.status, failed.caption, failed.error) == (
        JobStatus.FAILURE,
        None,
        "image missing",
    )
    assert failed.event_id == ok.event_id
    assert "webhook_url" not in json.loads(ok.model_dump_json())


def test_no_payload_for_a_job_that_is_not_finished() -> None:
    with pytest.raises(ValueError, match="not finished"):
        JobFinishedWebhook.from_state(JobState.pending("job-1", T0))


def test_the_webhook_url_is_part_of_the_idempotency_digest_only_when_given() -> None:
    options = GenerationOptions()
    plain = request_digest("url", b"https://x/a.png", options)
    assert plain == request_digest("url", b"https://x/a.png", options, None)
    with_hook = request_digest("url", b"https://x/a.png", options, "https://h/1")
    assert with_hook != plain
    assert with_hook != request_digest("url", b"https://x/a.png", options, "https://h/2")


# --- offsets --------------------------------------------------------------------------


def test_offsets_are_committed_only_below_the_lowest_unfinished_delivery() -> None:
    p = PartitionOffsets()
    assert p.to_commit() is None
    p.fetched(0, deliver=False)
    p.fetched(1, deliver=True)  # slow receiver
    p.fetched(2, deliver=True)
    p.fetched(3, deliver=False)
    assert p.to_commit() == 1
    p.committed = 1
    p.finished(2)  # a later delivery finishing first changes nothing
    assert p.to_commit() is None
    p.finished(1)
    assert p.to_commit() == 4


def test_a_revoked_partition_is_forgotten_and_its_late_finish_is_harmless() -> None:
    tracker = OffsetTracker()
    tp = TopicPartition("t", 0)
    old = tracker.partition(tp)
    old.fetched(5, deliver=True)
    assert tracker.to_commit() == {tp: 5}
    tracker.revoke([tp])
    new = tracker.partition(tp)
    assert new is not old
    new.fetched(5, deliver=True)
    old.finished(5)  # the cancelled delivery of the previous assignment
    assert tracker.to_commit() == {tp: 5}


# --- which terminal states are delivered ----------------------------------------------


def ended(
    submitted: datetime,
    finished: datetime,
    status: JobStatus = JobStatus.SUCCESS,
    job_id: str = "job-1",
) -> JobState:
    """A terminal state of job `job_id` with a webhook, at the times given."""
    return JobState(
        job_id=job_id,
        status=status,
        submitted_at=submitted,
        updated_at=finished,
        finished_at=finished,
        webhook_url="http://127.0.0.1/hook",
    )


def test_a_reused_job_id_is_delivered_again_but_a_repeated_terminal_state_is_not() -> None:
    jobs = FinishedJobs(max_jobs=10)
    first = ended(T0, T0 + timedelta(minutes=1))
    assert jobs.claim(first)
    assert not jobs.claim(first.model_copy()), "the same terminal state read again"
    redelivered = ended(T0, T0 + timedelta(minutes=2), JobStatus.FAILURE)
    assert not jobs.claim(redelivered), "the first terminal state of a job is final"
    reused = ended(T0 + timedelta(minutes=5), T0 + timedelta(minutes=6))
    assert jobs.claim(reused), "a job submitted under the id after the first finished"
    assert not jobs.claim(reused.model_copy())
    assert not jobs.claim(first), "a late state of the older job never wins"


def test_a_cancelled_delivery_is_sent_when_read_again() -> None:
    jobs = FinishedJobs(max_jobs=10)
    first = ended(T0, T0 + timedelta(minutes=1))
    assert jobs.claim(first)
    jobs.release(first)
    assert jobs.claim(first.model_copy())
    # Releasing a state no longer held does not forget the one held since.
    newer = ended(T0 + timedelta(minutes=5), T0 + timedelta(minutes=6))
    assert jobs.claim(newer)
    jobs.release(first)
    assert not jobs.claim(newer.model_copy())


def test_only_the_most_recent_jobs_are_remembered() -> None:
    jobs = FinishedJobs(max_jobs=2)
    states = [ended(T0, T0 + timedelta(minutes=1), job_id=f"job-{n}") for n in range(3)]
    assert all(jobs.claim(state) for state in states)
    assert list(jobs.held) == ["job-1", "job-2"]
    assert jobs.claim(states[0].model_copy()), "forgotten, so delivered again"
    assert not jobs.claim(states[2].model_copy())


async def test_the_dispatcher_delivers_terminal_states_with_a_webhook_once_per_job() -> None:
    """Records as read from the job-state topic (no broker: the consumer never starts)."""
    config = enabled()
    sender = WebhookSender(config, WebhookGuard(config), GatewayMetrics(JobView()))
    dispatcher = WebhookDispatcher(
        config, KafkaConnection.from_settings(config, "gateway"), "job-states", sender
    )
    try:
        first = ended(T0, T0 + timedelta(minutes=1))
        reused = ended(T0 + timedelta(minutes=5), T0 + timedelta(minutes=6))
        records = [
            JobState.pending("job-1", T0).model_copy(update={"webhook_url": "http://h/1"}),
            first,
            first,
            ended(T0, T0 + timedelta(minutes=1), job_id="job-2").model_copy(
                update={"webhook_url": None}
            ),
            reused,
            first,
        ]
        delivered = [dispatcher._to_deliver(state.model_dump_json().encode()) for state in records]
        assert delivered == [None, first, None, None, reused, None]
        assert dispatcher._to_deliver(None) is None, "a tombstone"
        assert dispatcher._to_deliver(b"not json") is None
    finally:
        await dispatcher.stop()


# --- the URL guard ----------------------------------------------------------------------


def resolver_to(*ips: str):  # type: ignore[no-untyped-def]
    import ipaddress

    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(ip) for ip in ips]

    return resolve


def enabled(**settings: object) -> GatewaySettings:
    return GatewaySettings(webhook_secret=SecretStr(SECRET), **settings)  # type: ignore[arg-type]


async def test_without_a_secret_a_webhook_url_is_refused() -> None:
    guard = WebhookGuard(GatewaySettings(), resolver_to("93.184.216.34"))
    assert await guard.check_submission(None) is None
    with pytest.raises(WebhookRefused, match="WEBHOOK_SECRET"):
        await guard.check_submission("https://hooks.example.com/x")


@pytest.mark.parametrize(
    ("url", "resolves_to", "needle"),
    [
        ("http://169.254.169.254/latest/meta-data", None, "metadata"),
        ("http://127.0.0.1/", None, "loopback"),
        ("http://[::1]:8080/", None, "loopback"),
        ("http://hooks.internal/x", "10.0.0.7", "private"),
        ("ftp://hooks.example.com/x", None, "http or https"),
        ("https://user:pw@hooks.example.com/x", None, "credentials"),
        ("http:///nohost", None, "refused"),
    ],
)
async def test_non_public_and_odd_webhook_urls_are_refused(
    url: str, resolves_to: str | None, needle: str
) -> None:
    guard = WebhookGuard(enabled(), resolver_to(resolves_to or "93.184.216.34"))
    with pytest.raises(WebhookRefused, match=needle) as refused:
        await guard.check_submission(url)
    assert refused.value.http_status == 400


async def test_refusals_are_worded_for_webhooks() -> None:
    """Each message says what a webhook is refused for, never what fetching would say."""
    guard = WebhookGuard(enabled(), resolver_to("10.0.0.7"))
    with pytest.raises(WebhookRefused) as refused:
        await guard.check_submission("http://hooks.internal/x")
    assert refused.value.detail == (
        "webhook_url refused: refusing to call hooks.internal (10.0.0.7): a private address"
    )

    async def broken(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    for url, resolver, expected in [
        ("http://hooks.example/x", broken, "webhook_url refused: cannot resolve 'hooks.example'"),
        ("http://hooks.invalid/x", resolver_to(), "webhook_url refused: unknown host"),
        ("gopher://hooks.example/x", broken, "webhook_url must be http or https"),
    ]:
        with pytest.raises(WebhookRefused) as refused:
            await WebhookGuard(enabled(), resolver).check_submission(url)
        assert refused.value.detail.startswith(expected)
        assert "fetch" not in refused.value.detail
        assert refused.value.http_status == 400


async def test_the_allow_list_admits_loopback_but_never_metadata() -> None:
    guard = WebhookGuard(
        enabled(webhook_allow_hosts=["127.0.0.1"], webhook_allow_networks=["169.254.0.0/16"]),
        resolver_to("93.184.216.34"),
    )
    assert await guard.check_submission("http://127.0.0.1:9/hook") == "http://127.0.0.1:9/hook"
    with pytest.raises(WebhookRefused, match="metadata"):
        await guard.check_submission("http://169.254.169.254/")


async def test_a_public_name_is_accepted() -> None:
    guard = WebhookGuard(enabled(), resolver_to("93.184.216.34"))
    assert await guard.check_submission("https://hooks.example.com/x")


# --- the sender against a real local receiver -------------------------------------------


class Receiver:
    """Answers with the next scripted status (the last one repeats) and records requests."""

    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        self.statuses = statuses
        self.headers = headers or {}
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                index = min(len(receiver.requests), len(receiver.statuses)) - 1
                self.send_response(receiver.statuses[index])
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.server.shutdown()
        receiver.server.server_close()


def make_sender(sleeps: list[float], **settings: object) -> tuple[WebhookSender, GatewayMetrics]:
    config = enabled(webhook_allow_hosts=["127.0.0.1"], webhook_backoff_s=1.0, **settings)
    metrics = GatewayMetrics(JobView())

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    sender = WebhookSender(config, WebhookGuard(config), metrics, sleep=sleep, rng=lambda: 1.0)
    return sender, metrics


def count(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_retried_after_two_500s_and_signed_every_time(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver([500, 500, 200]))
    sleeps: list[float] = []
    sender, metrics = make_sender(sleeps)
    state = finished().model_copy(update={"webhook_url": receiver.url})
    try:
        assert await sender.deliver(state) == "delivered"
    finally:
        await sender.aclose()
    assert len(receiver.requests) == 3
    assert sleeps == [1.0, 2.0]
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1, "the same body on every attempt"
    for headers, body in receiver.requests:
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body)
        assert headers[EVENT_ID_HEADER] == caption_event_id("job-1", T0)
        assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["caption"] == "a red square"
    total = "captionstream_gateway_webhook_attempts_total"
    assert count(metrics, total, result="5xx") == 2
    assert count(metrics, total, result="2xx") == 1
    outcomes = "captionstream_gateway_webhook_deliveries_total"
    assert count(metrics, outcomes, outcome="delivered") == 1


async def test_a_410_is_given_up_after_one_attempt(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver([410]))
    sleeps: list[float] = []
    sender, metrics = make_sender(sleeps)
    try:
        state = finished().model_copy(update={"webhook_url": receiver.url})
        assert await sender.deliver(state) == "rejected"
    finally:
        await sender.aclose()
    assert len(receiver.requests) == 1
    assert sleeps == []
    outcomes = "captionstream_gateway_webhook_deliveries_total"
    assert count(metrics, outcomes, outcome="rejected") == 1


async def test_429_retry_after_is_waited_and_attempts_run_out(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver([429], headers={"Retry-After": "7"}))
    sleeps: list[float] = []
    sender, metrics = make_sender(sleeps, webhook_max_attempts=3)
    try:
        state = finished().model_copy(update={"webhook_url": receiver.url})
        assert await sender.deliver(state) == "exhausted"
    finally:
        await sender.aclose()
    assert len(receiver.requests) == 3
    assert sleeps == [7.0, 7.0]
    assert count(metrics, "captionstream_gateway_webhook_attempts_total", result="429") == 3


async def test_no_receiver_is_a_network_error_and_retried() -> None:
    sleeps: list[float] = []
    sender, metrics = make_sender(sleeps, webhook_max_attempts=2)
    try:
        # Port 9 (discard) on loopback: nothing listens there.
        state = finished().model_copy(update={"webhook_url": "http://127.0.0.1:9/hook"})
        assert await sender.deliver(state) == "exhausted"
    finally:
        await sender.aclose()
    assert count(metrics, "captionstream_gateway_webhook_attempts_total", result="error") == 2


async def test_a_url_that_no_longer_passes_the_guard_is_not_called() -> None:
    """DNS is checked again at delivery: here the allow-list no longer admits loopback."""
    sleeps: list[float] = []
    config = enabled()
    metrics = GatewayMetrics(JobView())
    sender = WebhookSender(config, WebhookGuard(config), metrics)
    try:
        state = finished().model_copy(update={"webhook_url": "http://127.0.0.1:9/hook"})
        assert await sender.deliver(state) == "refused"
    finally:
        await sender.aclose()
    assert sleeps == []
    outcomes = "captionstream_gateway_webhook_deliveries_total"
    assert count(metrics, outcomes, outcome="refused") == 1
