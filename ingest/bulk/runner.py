"""The bulk run: submit the images, follow their results, journal them.

Submits with the gateway's validation, blob store and events (`submit_image` on a
`KafkaJobPublisher`), at most `concurrency` images in flight (a slot is held from
reading a file until its job finishes, is rejected or times out); follows the job-state
topic from the beginning, so that jobs of an earlier run are found too; and stops
cleanly on SIGINT/SIGTERM, keeping what is in flight in the sidecar for a rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from captionstream.errors import BrokerError, ImageRejected
from captionstream.ingest.blobstore import BlobStore, open_blob_store
from captionstream.ingest.bulk.files import WorkItem, discover, read_image_file
from captionstream.ingest.bulk.journal import (
    REJECTED,
    Journal,
    PendingJob,
    rejected_line,
    result_line,
)
from captionstream.ingest.bulk.progress import Progress, Summary
from captionstream.ingest.bulk.waiter import ResultWaiter
from captionstream.ingest.kafka_publishing import KafkaJobPublisher
from captionstream.ingest.submission import JobPublisher, submit_image
from captionstream.ingest.validation import ImageLimits, allow_pixels
from captionstream.kafka import (
    KafkaConnection,
    ensure_topics,
    own_topics,
    polls,
    start_topic_reader,
    stop_consumer,
)
from captionstream.schemas.events import (
    EventDecodeError,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    decode_job_state,
)
from captionstream.schemas.topics import TOPICS
from captionstream.settings import BulkIngestSettings

log = logging.getLogger(__name__)

# Warn when nothing has finished for this long while jobs are awaited.
STALL_WARNING_S = 60.0


class _RegisteringPublisher:
    """Registers the job as awaited, with the state it is published in, *before* its image
    event is published, so that a fast worker's terminal state can never be read before
    this run knows the job id."""

    def __init__(
        self,
        inner: JobPublisher,
        register: Callable[[JobState, ImageSubmitted], None],
        unregister: Callable[[str], None],
    ) -> None:
        self.inner = inner
        self.register = register
        self.unregister = unregister

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        self.register(state, event)
        try:
            await self.inner.publish_submission(state, event)
        except BaseException:
            self.unregister(event.job_id)
            raise


class BulkIngest:
    """One run: submit `todo`, wait for those and the `resumed` jobs, journal the results."""

    def __init__(
        self,
        settings: BulkIngestSettings,
        journal: Journal,
        *,
        concurrency: int,
        timeout_s: float,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.timeout_s = timeout_s
        self.progress = progress
        self.limits = ImageLimits.from_settings(settings)
        self.blobs: BlobStore = open_blob_store(settings)
        self.slots = asyncio.Semaphore(concurrency)
        self.waiter = ResultWaiter(self._on_done)
        self.summary = Summary()
        self.stop = asyncio.Event()
        self.inflight: set[asyncio.Task[None]] = set()
        self.fatal: BaseException | None = None
        self.last_finish = time.monotonic()

    # callbacks (run on the event loop, never concurrently)

    def _on_done(self, job: PendingJob, state: JobState, holds_slot: bool) -> None:
        self.journal.record_result(result_line(job, state))
        if state.status is JobStatus.SUCCESS:
            self.summary.success += 1
        else:
            self.summary.failure += 1
        self._finished(state.status.value, holds_slot)

    def _reject(self, path: str, error: str) -> None:
        self.journal.record_result(rejected_line(path, error))
        self.summary.rejected += 1
        self.progress.submitted()
        self._finished(REJECTED, holds_slot=True)

    def _finished(self, status: str, holds_slot: bool) -> None:
        self.progress.finished(status)
        self.last_finish = time.monotonic()
        if holds_slot:
            self.slots.release()

    # tasks

    async def _submit_one(self, item: WorkItem, publisher: JobPublisher) -> None:
        accepted = False
        try:
            try:
                data = await asyncio.to_thread(read_image_file, item.path, self.limits.max_bytes)
            except OSError as exc:
                self._reject(item.path, f"cannot read the file: {exc.strerror or exc}")
                return

            def register(state: JobState, event: ImageSubmitted) -> None:
                job = PendingJob(item.path, event.job_id, event.sha256)
                self.waiter.expect(job, time.monotonic(), state=state)

            registering = _RegisteringPublisher(publisher, register, self.waiter.forget)
            try:
                _, event = await submit_image(
                    data,
                    Path(item.path).name,
                    limits=self.limits,
                    blobs=self.blobs,
                    publisher=registering,
                    options=item.options,
                )
            except ImageRejected as exc:
                self._reject(item.path, exc.detail)
                return
            accepted = True
            self.progress.submitted()
            if event.job_id in self.waiter:  # else it finished while being published
                self.journal.record_submitted(PendingJob(item.path, event.job_id, event.sha256))
        except Exception as exc:  # Kafka or the blob store: not the image's fault
            if self.fatal is None:
                self.fatal = exc
            self.stop.set()
            if not accepted:
                self.slots.release()

    async def _submit_all(self, todo: list[WorkItem], publisher: JobPublisher) -> None:
        for item in todo:
            await self.slots.acquire()
            if self.stop.is_set():
                self.slots.release()
                return
            task = asyncio.create_task(self._submit_one(item, publisher))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        async for batches in polls(consumer, TOPICS.job_state.name):
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue
                    try:
                        state = decode_job_state(record.value)
                    except EventDecodeError:
                        continue
                    self.waiter.apply(state)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for job, holds_slot in self.waiter.expire(now, self.timeout_s):
            log.warning(
                "no result for %s (job %s) after %.0fs; it stays in %s for a rerun",
                job.path,
                job.job_id,
                self.timeout_s,
                self.journal.pending_path,
            )
            self.journal.pending.setdefault(job.path, job)
            self.summary.timed_out += 1
            if holds_slot:
                self.slots.release()
        if self.waiter and now - self.last_finish > STALL_WARNING_S:
            log.warning(
                "no job finished in the last %.0fs (%d awaited); is a worker running?",
                STALL_WARNING_S,
                len(self.waiter),
            )
            self.last_finish = now

    async def run(self, todo: list[WorkItem], resumed: Iterable[PendingJob]) -> Summary:
        settings = self.settings
        allow_pixels(settings.max_pixels)
        await asyncio.to_thread(self.blobs.check)  # a wrong blob store: stop before Kafka
        kafka = KafkaConnection.from_settings(settings, "ingest")
        await ensure_topics(
            kafka, own_topics(settings.partitions), replication_factor=settings.replication_factor
        )
        producer = kafka.producer(request_timeout_s=settings.kafka_timeout_s)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap} ({exc!r})") from exc
        consumer: AIOKafkaConsumer | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            consumer = await start_topic_reader(kafka, TOPICS.job_state.name)
            now = time.monotonic()
            for job in resumed:
                self.waiter.expect(job, now, holds_slot=False)
            publisher = KafkaJobPublisher(producer)
            follow = asyncio.create_task(self._follow(consumer), name="bulk-follow")
            submit = asyncio.create_task(self._submit_all(todo, publisher), name="bulk-submit")
            tasks = [follow, submit]
            while not self.stop.is_set():
                if follow.done():
                    follow.result()  # raises what ended it
                    raise BrokerError("stopped following the job-state topic")
                if submit.done():
                    submit.result()  # surfaces a bug rather than hiding it
                    if not self.inflight and not self.waiter:
                        break
                self._check_timeouts()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.1)
            # Interrupted (or a fatal error): submit nothing new, but let the submits in
            # flight finish so that each accepted job is in the sidecar, not lost.
            submit.cancel()
            if self.inflight:
                await asyncio.gather(*self.inflight, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if consumer is not None:
                await stop_consumer(consumer)
            await producer.stop()
            self.blobs.close()
        if self.fatal is not None:
            raise BrokerError(f"submitting stopped: {self.fatal!r}") from self.fatal
        self.summary.unfinished = len(self.journal.pending)
        return self.summary


def run_bulk_ingest(
    source: Path,
    out: Path,
    settings: BulkIngestSettings,
    *,
    options: GenerationOptions | None = None,
    concurrency: int | None = None,
    timeout_s: float | None = None,
    progress: bool | None = None,
) -> Summary:
    """The `captionstream ingest` command: SIGINT/SIGTERM stop it cleanly (a second one
    at once), with what finished written and what is in flight kept for a rerun."""
    items = discover(source, options)
    journal = Journal(out)
    todo = [item for item in items if item.path not in journal.done]
    skipped = len(items) - len(todo)
    resumed = [journal.pending[item.path] for item in todo if item.path in journal.pending]
    # Jobs of an earlier run whose paths are not in this source are still waited for.
    resumed_paths = {job.path for job in resumed}
    resumed += [job for path, job in journal.pending.items() if path not in resumed_paths]
    todo = [item for item in todo if item.path not in journal.pending]
    log.info(
        "%d images: %d already done, %d awaited from an earlier run, %d to submit",
        len(items),
        skipped,
        len(resumed),
        len(todo),
    )
    bars = Progress(
        to_submit=len(todo),
        total=skipped + len(resumed) + len(todo),
        already_done=skipped,
        enabled=progress,
    )
    run = BulkIngest(
        settings,
        journal,
        concurrency=concurrency or settings.ingest_concurrency,
        timeout_s=timeout_s or settings.ingest_timeout_s,
        progress=bars,
    )
    run.summary.skipped = skipped

    async def main() -> Summary:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()

        def interrupt(signum: int) -> None:
            if run.summary.interrupted_by is None:
                run.summary.interrupted_by = signum
                log.warning("interrupted: finishing the submits in flight (again to quit at once)")
                run.stop.set()
            elif me is not None:
                me.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt, sig)
        return await run.run(todo, resumed)

    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            summary = asyncio.run(main())
    except asyncio.CancelledError:  # a second signal
        summary = run.summary
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        summary = run.summary
        summary.interrupted_by = signal.SIGINT
    finally:
        bars.close()
        journal.close()
    summary.unfinished = len(journal.pending)
    return summary
