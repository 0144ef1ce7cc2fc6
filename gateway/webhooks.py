"""Webhooks: a job's `webhook_url` gets a signed POST once the job is SUCCESS or FAILURE.

- Submission: `WebhookGuard.check_submission` vets the URL with the SSRF guard of image
  fetching (`ingest.fetch.vet_url`: http/https, no credentials, every resolved address
  public unless allow-listed by `WEBHOOK_ALLOW_HOSTS` / `_NETWORKS`, metadata addresses
  never). Webhooks are on only with `CAPTIONSTREAM_WEBHOOK_SECRET`: without it a
  `webhook_url` is refused (400) rather than called unsigned, because a receiver could
  not tell our calls from forged ones, and a URL accepted but never called would be worse.
- Delivery: `WebhookDispatcher` reads the compacted job-state topic in a consumer group
  (`WEBHOOK_GROUP_ID`), so with several gateway replicas each partition, and so each
  finished job, is handled by one of them. At-least-once: a partition's offset is
  committed only up to its lowest record whose webhook is not finished (delivered or
  given up), so a crash redelivers; receivers drop duplicates by `event_id`.
  Deliveries run concurrently (at most `WEBHOOK_MAX_IN_FLIGHT`, then fetching pauses), so
  a slow receiver delays only its own webhook.
- Each attempt vets the URL again (DNS may have changed since submission) and connects to
  the vetted address; redirects are not followed. Network errors, 5xx, 408 and 429 are
  retried with exponential backoff and jitter (`Retry-After` honoured up to the cap), at
  most `WEBHOOK_MAX_ATTEMPTS` attempts; any other answer ends the delivery.

The pure parts (backoff, answer classification, `Retry-After`, offset bookkeeping) are
plain functions and classes; the payload and signature are in `schemas.webhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from captionstream.errors import FetchError, WebhookRefused
from captionstream.kafka import KafkaConnection, stop_consumer
from captionstream.logging_config import job_context
from captionstream.settings import GatewaySettings
from gateway.metrics import GatewayMetrics
from ingest.fetch import FetchPolicy, Resolver, VettedURL, system_resolver, vet_url
from schemas.events import EventDecodeError, JobState, decode_job_state, utcnow
from schemas.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, JobFinishedWebhook, sign

log = logging.getLogger(__name__)

USER_AGENT = "captionstream-webhooks/1"
RETRY_STATUSES = frozenset({408, 429})


# --- pure policy ----------------------------------------------------------------------


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify(status_code: int | None) -> Verdict:
    """What an answer means: 2xx delivered; no answer (None), 5xx, 408 and 429 are worth
    another attempt; anything else (other 4xx, a redirect, which is not followed) is final."""
    if status_code is None or status_code >= 500 or status_code in RETRY_STATUSES:
        return Verdict.RETRY
    if 200 <= status_code < 300:
        return Verdict.DELIVERED
    return Verdict.REJECTED


def backoff_delay(
    failures: int, base_s: float, cap_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1, 2, ...): `base_s`
    doubling each time up to `cap_s`, then jittered to between half and all of it, so
    many webhooks that failed together do not all retry at the same instant."""
    if failures < 1:
        raise ValueError("backoff_delay is for after a failed attempt (failures >= 1)")
    ceiling = min(cap_s, base_s * 2.0 ** min(failures - 1, 62))
    return ceiling * (0.5 + 0.5 * rng())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date; None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - (now or utcnow())).total_seconds())


def retry_delay(
    failures: int,
    retry_after_s: float | None,
    base_s: float,
    cap_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """The wait before the next attempt: the backoff, or longer if the receiver asked
    for longer with `Retry-After` (but never longer than `cap_s`)."""
    delay = backoff_delay(failures, base_s, cap_s, rng)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


@dataclass
class PartitionOffsets:
    """Offsets of one assigned partition: records fetched, and those whose webhook is
    still being delivered. Everything below `committable` is finished."""

    next_offset: int | None = None  # after the last record fetched
    pending: set[int] = field(default_factory=set)
    committed: int | None = None

    def fetched(self, offset: int, deliver: bool) -> None:
        self.next_offset = offset + 1
        if deliver:
            self.pending.add(offset)

    def finished(self, offset: int) -> None:
        self.pending.discard(offset)

    @property
    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset

    def to_commit(self) -> int | None:
        """The offset to commit now, if it moved since the last commit."""
        offset = self.committable
        if offset is None or offset == self.committed:
            return None
        return offset


class OffsetTracker:
    """`PartitionOffsets` per assigned partition. A partition's object is replaced when
    it is revoked, so a delivery that outlives its assignment cannot touch the next one."""

    def __init__(self) -> None:
        self.partitions: dict[TopicPartition, PartitionOffsets] = {}

    def partition(self, tp: TopicPartition) -> PartitionOffsets:
        return self.partitions.setdefault(tp, PartitionOffsets())

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.partitions.pop(tp, None)

    def to_commit(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        chosen = self.partitions if tps is None else {tp: None for tp in tps}
        commits = {}
        for tp in chosen:
            offsets = self.partitions.get(tp)
            offset = None if offsets is None else offsets.to_commit()
            if offset is not None:
                commits[tp] = offset
        return commits

    def committed(self, commits: dict[TopicPartition, int]) -> None:
        for tp, offset in commits.items():
            if tp in self.partitions:
                self.partitions[tp].committed = offset


# --- the URL guard ----------------------------------------------------------------------


class WebhookGuard:
    """Vets webhook URLs at submission and again before every attempt."""

    def __init__(self, settings: GatewaySettings, resolver: Resolver = system_resolver) -> None:
        self.enabled = settings.webhooks_enabled
        self.policy = FetchPolicy(
            max_bytes=0,
            allow_hosts=frozenset(settings.webhook_allow_hosts),
            allow_networks=tuple(settings.webhook_allow_networks),
        )
        self.resolver = resolver
        self.resolve_timeout_s = settings.webhook_timeout_s

    async def vet(self, url: str) -> VettedURL:
        """Raises `WebhookRefused` (400) for a URL that must not be called."""
        shown = url[:100]
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise WebhookRefused(f"webhook_url {shown!r} is not a valid URL: {exc}") from exc
        if parsed.scheme not in ("http", "https"):
            raise WebhookRefused(f"webhook_url must be http or https, not {shown!r}")
        if parsed.userinfo:
            raise WebhookRefused(
                "credentials in webhook_url are not accepted (webhooks are signed instead)"
            )
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                return await vet_url(parsed, self.policy, self.resolver)
        except TimeoutError as exc:
            raise WebhookRefused(f"webhook_url host of {shown!r} did not resolve in time") from exc
        except FetchError as exc:  # FetchRefused included
            detail = exc.detail.replace("refusing to fetch from", "refusing to call")
            raise WebhookRefused(f"webhook_url refused: {detail}") from exc

    async def check_submission(self, url: str | None) -> str | None:
        """`url` if a job may carry it (None stays None); else `WebhookRefused`."""
        if url is None:
            return None
        if not self.enabled:
            raise WebhookRefused(
                "webhooks are not enabled on this server (CAPTIONSTREAM_WEBHOOK_SECRET is "
                "not set); submit without webhook_url"
            )
        await self.vet(url)
        return url


# --- sending ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    status_code: int | None  # None: no answer (connection failed, timed out)
    retry_after_s: float | None = None
    error: str | None = None

    @property
    def result_label(self) -> str:
        if self.status_code is None:
            return "error"
        if self.status_code == 429:
            return "429"
        return f"{self.status_code // 100}xx"


class WebhookSender:
    """Delivers one job's webhook with retries. `sleep` and `rng` are injectable."""

    def __init__(
        self,
        settings: GatewaySettings,
        guard: WebhookGuard,
        metrics: GatewayMetrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        verify: bool = True,
    ) -> None:
        assert settings.webhook_secret is not None, "webhooks need a secret"
        self.secret = settings.webhook_secret.get_secret_value()
        self.guard = guard
        self.metrics = metrics
        self.max_attempts = settings.webhook_max_attempts
        self.backoff_s = settings.webhook_backoff_s
        self.backoff_max_s = settings.webhook_backoff_max_s
        self.timeout_s = settings.webhook_timeout_s
        self.sleep = sleep
        self.rng = rng
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s),
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            # Connections are opened to vetted addresses; one must never be reused for
            # another host name (see ingest.fetch).
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def deliver(self, state: JobState) -> str:
        """Send the webhook of a finished job until delivered or given up; the outcome
        (`delivered`, `rejected`, `exhausted`, `refused`) is counted and returned."""
        assert state.webhook_url is not None
        payload = JobFinishedWebhook.from_state(state)
        body = payload.model_dump_json().encode()
        ctx = job_context(state.job_id)
        outcome = "exhausted"
        for number in range(1, self.max_attempts + 1):
            try:
                target = await self.guard.vet(state.webhook_url)
            except WebhookRefused as exc:
                log.warning("webhook of job %s not sent: %s", state.job_id, exc.detail, extra=ctx)
                outcome = "refused"
                break
            attempt = await self.attempt(target, body, payload.event_id)
            self.metrics.webhook_attempts.labels(attempt.result_label).inc()
            verdict = classify(attempt.status_code)
            if verdict is Verdict.DELIVERED:
                log.info(
                    "webhook of job %s delivered (attempt %d)", state.job_id, number, extra=ctx
                )
                outcome = "delivered"
                break
            what = attempt.error or f"HTTP {attempt.status_code}"
            if verdict is Verdict.REJECTED:
                log.warning(
                    "webhook of job %s given up: %s is not retried", state.job_id, what, extra=ctx
                )
                outcome = "rejected"
                break
            if number == self.max_attempts:
                log.warning(
                    "webhook of job %s given up after %d attempts (last: %s)",
                    state.job_id,
                    number,
                    what,
                    extra=ctx,
                )
                break
            delay = retry_delay(
                number, attempt.retry_after_s, self.backoff_s, self.backoff_max_s, self.rng
            )
            log.info(
                "webhook of job %s attempt %d failed (%s); retrying in %.1fs",
                state.job_id,
                number,
                what,
                delay,
                extra=ctx,
            )
            await self.sleep(delay)
        self.metrics.webhook_deliveries.labels(outcome).inc()
        return outcome

    async def attempt(self, target: VettedURL, body: bytes, event_id: str) -> Attempt:
        """One POST, to the first vetted address that accepts a connection."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: event_id,
            SIGNATURE_HEADER: sign(self.secret, body),
        }
        failures: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for request in target.requests(self.client, "POST", content=body, headers=headers):
                    try:
                        response = await self.client.send(request, stream=True)
                    except httpx.ConnectError as exc:
                        failures.append(f"{request.url.host}: {exc}")
                        continue
                    await response.aclose()  # the answer's body is not needed
                    return Attempt(
                        response.status_code,
                        parse_retry_after(response.headers.get("retry-after")),
                    )
        except TimeoutError:
            return Attempt(None, error=f"no answer within {self.timeout_s:g}s")
        except httpx.HTTPError as exc:
            return Attempt(None, error=f"{type(exc).__name__}: {exc}")
        return Attempt(None, error=f"cannot connect to {target.host}: {'; '.join(failures)}")


# --- the dispatcher -------------------------------------------------------------------


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, dispatcher: WebhookDispatcher) -> None:
        self.dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.dispatcher.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("webhooks: this replica now handles %s", sorted(tp.partition for tp in assigned))


class WebhookDispatcher:
    """Consumes the job-state topic in a consumer group and sends the webhooks of
    finished jobs (see the module docstring)."""

    SEEN_MAX = 10_000  # finished jobs remembered, so a repeated terminal state is skipped

    def __init__(
        self,
        settings: GatewaySettings,
        kafka: KafkaConnection,
        topic: str,
        sender: WebhookSender,
        poll_ms: int = 500,
    ) -> None:
        self.topic = topic
        self.sender = sender
        self.max_in_flight = settings.webhook_max_in_flight
        self.poll_ms = poll_ms
        self.consumer = kafka.group_consumer(settings.webhook_group_id)
        self.offsets = OffsetTracker()
        self.deliveries: dict[asyncio.Task[str], TopicPartition] = {}
        self.seen: OrderedDict[tuple[str, datetime], None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._paused = False

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self.deliveries):
            task.cancel()
        await asyncio.gather(*self.deliveries, return_exceptions=True)
        await self._commit()  # what finished before the stop
        await stop_consumer(self.consumer)
        await self.sender.aclose()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=self.poll_ms)
            except KafkaError as exc:
                log.warning("webhooks: job-state fetch failed (%r); retrying", exc)
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                offsets = self.offsets.partition(tp)
                for record in records:
                    state = self._to_deliver(record.value)
                    offsets.fetched(record.offset, deliver=state is not None)
                    if state is not None:
                        self._spawn(tp, offsets, record.offset, state)
            self._apply_backpressure()
            await self._commit()

    def _to_deliver(self, raw: bytes | None) -> JobState | None:
        if raw is None:  # a tombstone
            return None
        try:
            state = decode_job_state(raw)
        except EventDecodeError as exc:
            log.warning("webhooks: ignoring bad job-state record: %s", exc)
            return None
        if not state.status.terminal or state.webhook_url is None:
            return None
        key = (state.job_id, state.submitted_at)
        if key in self.seen:  # the first terminal state is final, as in the view
            return None
        self.seen[key] = None
        while len(self.seen) > self.SEEN_MAX:
            self.seen.popitem(last=False)
        return state

    def _spawn(
        self, tp: TopicPartition, offsets: PartitionOffsets, offset: int, state: JobState
    ) -> None:
        task = asyncio.create_task(self.sender.deliver(state), name=f"webhook-{state.job_id}")
        self.deliveries[task] = tp

        def finished(done: asyncio.Task[str]) -> None:
            self.deliveries.pop(done, None)
            if done.cancelled():
                # Not finished: its offset stays uncommitted, and if this replica reads
                # the record again it must not skip it as seen.
                self.seen.pop((state.job_id, state.submitted_at), None)
                return
            if done.exception() is not None:
                log.error(
                    "webhook of job %s failed unexpectedly",
                    state.job_id,
                    exc_info=done.exception(),
                    extra=job_context(state.job_id),
                )
            offsets.finished(offset)

        task.add_done_callback(finished)

    def _apply_backpressure(self) -> None:
        """Stop fetching while `max_in_flight` webhooks are under way (the consumer keeps
        polling, so the group does not think this member is dead)."""
        full = len(self.deliveries) >= self.max_in_flight
        if full and not self._paused:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
        elif not full and self._paused:
            self.consumer.resume(*self.consumer.assignment())
            self._paused = False

    async def _commit(self, tps: Iterable[TopicPartition] | None = None) -> None:
        assigned = self.consumer.assignment()
        commits = {
            tp: offset for tp, offset in self.offsets.to_commit(tps).items() if tp in assigned
        }
        if not commits:
            return
        try:
            await self.consumer.commit(commits)
        except KafkaError as exc:  # e.g. a rebalance under way: committed again later
            log.warning("webhooks: commit failed (%r); will retry", exc)
            return
        self.offsets.committed(commits)

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Commit what finished, then hand the partitions over: their deliveries still
        under way are cancelled, and the next owner sends them again."""
        await self._commit(revoked)
        for task, tp in list(self.deliveries.items()):
            if tp in revoked:
                task.cancel()
        self.offsets.revoke(revoked)
        self._paused = False
