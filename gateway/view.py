"""The gateway's materialized view of job state, rebuilt from the compacted job-state topic.

Every gateway replica follows the whole topic (no consumer group: each one needs every
partition), so any replica can answer any job, and a restarted one rebuilds its view by
reading the topic from the beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from aiokafka import TopicPartition

from captionstream.kafka import (
    KafkaConnection,
    assign_whole_topic,
    polls,
    readable_end,
    stop_consumer,
)
from captionstream.schemas.events import EventDecodeError, JobState, JobStatus, decode_job_state

log = logging.getLogger(__name__)


class JobView:
    """job id -> latest `JobState`, with per-job change subscriptions for push channels.

    `terminal_listeners` are called with every state that makes a job terminal in the
    view (at most once per job, since the first terminal state is final).
    """

    def __init__(self) -> None:
        self._jobs: dict[str, JobState] = {}
        # Each subscriber's queue gets every later state of its job, and None when the
        # job is forgotten (expired): followers end then instead of waiting forever.
        self._subscribers: defaultdict[str, set[asyncio.Queue[JobState | None]]] = defaultdict(set)
        self._by_status: Counter[JobStatus] = Counter()
        self._by_idempotency_key: dict[str, str] = {}  # key -> job id (first job wins)
        self._success_by_cache_key: dict[str, str] = {}  # cache key -> a SUCCESS job id
        # The model of the newest caption the processors made: cached captions of other
        # models are not served, so a deployment that changes model stops reusing old ones.
        self._current_model: tuple[datetime, str] | None = None
        self._key_locks: dict[str, asyncio.Lock] = {}
        self.terminal_listeners: list[Callable[[JobState], None]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def find_cached(self, cache_key: str) -> JobState | None:
        """A SUCCESS state for the same image content and options, made by the model
        the processors run now (the model of the newest caption they made), if any."""
        job_id = self._success_by_cache_key.get(cache_key)
        hit = None if job_id is None else self._jobs.get(job_id)
        if hit is None or self._current_model is None or hit.model != self._current_model[1]:
            return None
        return hit

    def find_by_idempotency_key(self, key: str) -> JobState | None:
        job_id = self._by_idempotency_key.get(key)
        return None if job_id is None else self._jobs.get(job_id)

    @contextlib.asynccontextmanager
    async def idempotency_lock(self, key: str) -> AsyncIterator[None]:
        """Serialize requests with the same Idempotency-Key on this replica, so that
        concurrent retries cannot both create a job."""
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._key_locks.get(key) is lock:
                del self._key_locks[key]

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs the view holds in each status (every status, zeros included)."""
        return {status: self._by_status[status] for status in JobStatus}

    def apply(self, state: JobState) -> bool:
        """Record `state`; True if it changed the view (and was pushed to subscribers)."""
        old = self._jobs.get(state.job_id)
        if state == old or not state.supersedes(old):
            return False
        self._jobs[state.job_id] = state
        if state.idempotency_key is not None:
            self._by_idempotency_key.setdefault(state.idempotency_key, state.job_id)
        if state.status is JobStatus.SUCCESS:
            self._index_success(state)
        if old is not None:
            self._by_status[old.status] -= 1
        self._by_status[state.status] += 1
        for queue in self._subscribers.get(state.job_id, ()):
            queue.put_nowait(state)
        if state.status.terminal:
            for listener in self.terminal_listeners:
                try:
                    listener(state)
                except Exception:  # an observer must never break the view
                    log.exception("terminal-state listener %r failed", listener)
        return True

    def _index_success(self, state: JobState) -> None:
        """Track the processors' current model and the cache entry of `state`'s key.

        States arrive in log order per partition but not across partitions (and a
        restarted gateway replays them all), so "newest" is decided by `finished_at`.
        """
        made_at = state.finished_at or state.updated_at
        newest = self._current_model is None or made_at >= self._current_model[0]
        if state.cached_from is None and state.model is not None and newest:
            self._current_model = (made_at, state.model)
        if state.cache_key is None:
            return
        earlier_id = self._success_by_cache_key.get(state.cache_key)
        earlier = None if earlier_id is None else self._jobs.get(earlier_id)
        # The first caption of a key stays its entry, unless a caption by another model
        # comes later: then the newer model's caption replaces it.
        if earlier is None or (
            earlier.model != state.model and made_at >= (earlier.finished_at or earlier.updated_at)
        ):
            self._success_by_cache_key[state.cache_key] = state.job_id

    def forget(self, job_id: str) -> None:
        """Drop an expired job (a tombstone on the job-state topic, or the TTL sweep); its
        followers end."""
        state = self._jobs.pop(job_id, None)
        if state is None:
            return
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(None)
        self._by_status[state.status] -= 1
        if state.idempotency_key and self._by_idempotency_key.get(state.idempotency_key) == job_id:
            del self._by_idempotency_key[state.idempotency_key]
        if state.cache_key and self._success_by_cache_key.get(state.cache_key) == job_id:
            del self._success_by_cache_key[state.cache_key]

    def expired(self, cutoff: datetime) -> list[JobState]:
        """Jobs that finished before `cutoff`."""
        return [
            s for s in self._jobs.values() if s.finished_at is not None and s.finished_at < cutoff
        ]

    async def follow(self, job_id: str) -> AsyncIterator[JobState]:
        """The job's current state, then every change, ending after a terminal state or
        when the job is forgotten (expired).

        Subscribes before reading the current state, so no change can slip between.
        Yields nothing for an unknown job.
        """
        with self.subscribe(job_id) as changes:
            state: JobState | None = self.get(job_id)
            while state is not None:
                yield state
                if state.status.terminal:
                    return
                state = await changes.get()

    @contextlib.contextmanager
    def subscribe(self, job_id: str):  # type: ignore[no-untyped-def]
        """Yield a queue receiving every later state of `job_id` (None once the job is
        forgotten) until the block ends."""
        queue: asyncio.Queue[JobState | None] = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        try:
            yield queue
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del self._subscribers[job_id]


class JobStateFollower:
    """Feeds a `JobView` from the job-state topic; `start()` returns once caught up."""

    def __init__(self, view: JobView, kafka: KafkaConnection, topic: str) -> None:
        self.view = view
        self.topic = topic
        self.consumer = kafka.reader()
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, catch_up_timeout_s: float) -> None:
        await self.consumer.start()
        tps = await assign_whole_topic(self.consumer, self.topic)
        self._task = asyncio.create_task(self._run(tps), name="job-state-follower")
        try:
            await asyncio.wait_for(self.caught_up.wait(), catch_up_timeout_s)
        except TimeoutError:
            log.warning("job view not caught up after %.0fs; serving anyway", catch_up_timeout_s)
        log.info("job view holds %d jobs", len(self.view))

    @property
    def running(self) -> bool:
        """Whether the follow loop is alive (it retries Kafka errors; anything else ends it)."""
        return self._task is not None and not self._task.done()

    async def _run(self, tps: list[TopicPartition]) -> None:
        # Caught up once each partition's position reaches the high watermark of a fetch
        # response (the log end when the broker answered, so at or after start). Not
        # from end_offsets() (ListOffsets): the embedded broker on s3:// storage answers
        # it wrongly (too low), and the view would claim to be rebuilt far too early.
        pending = set(tps)
        async for batches in polls(self.consumer, self.topic):
            for records in batches.values():
                for record in records:
                    self._apply(record.key, record.value)
            if pending:
                for tp in list(pending):
                    end = readable_end(self.consumer, tp)
                    if end is not None and await self.consumer.position(tp) >= end:
                        pending.discard(tp)
                if not pending:
                    self.caught_up.set()

    def _apply(self, key: bytes | None, raw: bytes | None) -> None:
        if raw is None:  # a tombstone: the job expired
            if key is not None:
                self.view.forget(key.decode(errors="replace"))
            return
        try:
            self.view.apply(decode_job_state(raw))
        except EventDecodeError as exc:
            log.warning("ignoring bad job-state record: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await stop_consumer(self.consumer)
