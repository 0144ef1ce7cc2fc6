"""The consumer-group loop that sends webhooks: which finished jobs to deliver, the
deliveries under way (at most `WEBHOOK_MAX_IN_FLIGHT`, then fetching pauses), commits
only below unfinished deliveries, and hand-over of partitions on a rebalance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from captionstream.gateway.webhooks.delivery import WebhookSender
from captionstream.gateway.webhooks.offsets import OffsetTracker, PartitionOffsets
from captionstream.kafka import KafkaConnection, polls, stop_consumer
from captionstream.logging_config import job_context
from captionstream.schemas.events import EventDecodeError, JobState, decode_job_state
from captionstream.settings import GatewaySettings

log = logging.getLogger(__name__)


class FinishedJobs:
    """The terminal state whose webhook was sent or is under way, per job id, for the
    `max_jobs` most recent jobs. A terminal state is delivered only if it supersedes the
    one held (`JobState.supersedes`): a repeated or later terminal state of the same job
    is skipped (the first is final, as in the view), while a job submitted under the id
    after the held one finished is a new job and gets its own webhook."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self.held: OrderedDict[str, JobState] = OrderedDict()

    def claim(self, state: JobState) -> bool:
        """Whether the webhook of `state` (terminal) is to be sent; if so, it is held."""
        if not state.supersedes(self.held.get(state.job_id)):
            return False
        self.held[state.job_id] = state
        self.held.move_to_end(state.job_id)
        while len(self.held) > self.max_jobs:
            self.held.popitem(last=False)
        return True

    def release(self, state: JobState) -> None:
        """Forget `state`, whose delivery was cancelled before it finished: read again, it
        must be sent, not skipped as delivered."""
        if self.held.get(state.job_id) is state:
            del self.held[state.job_id]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, dispatcher: WebhookDispatcher) -> None:
        self.dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.dispatcher.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("webhooks: this replica now handles %s", sorted(tp.partition for tp in assigned))


class WebhookDispatcher:
    """Consumes the job-state topic in a consumer group and sends the webhooks of
    finished jobs (see `gateway.webhooks`)."""

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
        self.finished_jobs = FinishedJobs(self.SEEN_MAX)
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
        reads = polls(self.consumer, "job states for webhooks", timeout_ms=self.poll_ms)
        async for polled in reads:
            for tp, records in polled.items():
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
        return state if self.finished_jobs.claim(state) else None

    def _spawn(
        self, tp: TopicPartition, offsets: PartitionOffsets, offset: int, state: JobState
    ) -> None:
        task = asyncio.create_task(self.sender.deliver(state), name=f"webhook-{state.job_id}")
        self.deliveries[task] = tp

        def finished(done: asyncio.Task[str]) -> None:
            self.deliveries.pop(done, None)
            if done.cancelled():
                # Not finished: its offset stays uncommitted, and if this replica reads
                # the record again it must not skip it as delivered.
                self.finished_jobs.release(state)
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
