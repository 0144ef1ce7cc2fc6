"""Bulk ingest: many local images straight to Kafka, results written as JSON lines.

`captionstream ingest SOURCE --out FILE.jsonl` submits every image of a directory, a
single file or a manifest with the same validation, blob store and events as the gateway
(`ingest.submission.submit_image` on a `KafkaJobPublisher`), follows the job-state topic
for the results, and appends one line per image to FILE.jsonl as each one finishes.

The output file is the journal. A line with a terminal status (SUCCESS, FAILURE,
REJECTED) means "done": a rerun skips that path. Jobs submitted but not finished are
appended to the sidecar `FILE.jsonl.pending` (path, job id, sha256), so a rerun waits for
those job ids instead of submitting the images again. The sidecar is rewritten with what
is still unfinished when a run ends, and removed when nothing is.

The pure parts (manifest parsing, journal bookkeeping, result lines, the waiting list)
are plain functions and classes; `BulkIngest` wires them to Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from captionstream.errors import BrokerError, CaptionstreamError, ImageRejected, ImageTooLarge
from captionstream.kafka import (
    KafkaConnection,
    ensure_topics,
    own_topics,
    start_topic_reader,
    stop_consumer,
)
from captionstream.settings import BulkIngestSettings
from gateway.publisher import KafkaJobPublisher
from ingest.blobstore import BlobStore, open_blob_store
from ingest.submission import JobPublisher, submit_image
from ingest.validation import ALLOWED_EXTENSIONS, ImageLimits, allow_pixels
from schemas.events import (
    EventDecodeError,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    decode_job_state,
)
from schemas.topics import TOPICS

log = logging.getLogger(__name__)

REJECTED = "REJECTED"
# Statuses that end an image's story in the journal: a rerun never redoes these paths.
DONE_STATUSES = frozenset({JobStatus.SUCCESS.value, JobStatus.FAILURE.value, REJECTED})
# Warn when nothing has finished for this long while jobs are awaited.
STALL_WARNING_S = 60.0


class BulkIngestError(CaptionstreamError):
    """A bad source, manifest or output file (not a bad image: those are REJECTED lines)."""


# --- what to ingest ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One image to ingest: its absolute path (the journal key) and generation options."""

    path: str
    options: GenerationOptions = field(default_factory=GenerationOptions)


def absolute(path: str | Path, base: Path | None = None) -> str:
    """The journal key of a path: absolute and normalised, symlinks left as they are, so
    a rerun from another directory or with a relative path finds the same lines."""
    expanded = Path(os.path.expanduser(path))
    return os.path.abspath(expanded if base is None else base / expanded)


def scan_directory(root: Path) -> list[str]:
    """Files under `root` (recursively) whose extension names an image type, sorted.
    The extension only picks candidates: validation decodes each one and decides."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in ALLOWED_EXTENSIONS:
                found.append(absolute(Path(dirpath) / name))
    return found


def parse_text_manifest(text: str, base: Path, defaults: GenerationOptions) -> list[WorkItem]:
    """One path per line, relative to the manifest's directory; blank lines and lines
    starting with `#` are ignored."""
    items = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            items.append(WorkItem(absolute(entry, base), defaults))
    return items


def merge_options(defaults: GenerationOptions, overrides: object) -> GenerationOptions:
    """Per-image options over the run's defaults (a field set to null clears a default)."""
    if not isinstance(overrides, dict):
        raise ValueError('"options" must be a JSON object')
    return GenerationOptions.model_validate({**defaults.model_dump(exclude_none=True), **overrides})


def parse_jsonl_manifest(
    text: str, base: Path, defaults: GenerationOptions, name: str = "manifest"
) -> list[WorkItem]:
    """One JSON object per line: `{"path": "...", "options": {...}}` (options optional).
    Any mistake is an error naming the line: nothing is submitted from a bad manifest."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BulkIngestError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise BulkIngestError(f'{where}: expected an object like {{"path": "a.jpg"}}')
        unknown = set(record) - {"path", "options"}
        if unknown:
            raise BulkIngestError(f"{where}: unknown keys {sorted(unknown)}; use path, options")
        path = record.get("path")
        if not isinstance(path, str) or not path.strip():
            raise BulkIngestError(f'{where}: "path" must be a non-empty string')
        options = defaults
        if "options" in record:
            try:
                options = merge_options(defaults, record["options"])
            except (ValueError, ValidationError) as exc:
                raise BulkIngestError(f"{where}: bad options: {exc}") from exc
        items.append(WorkItem(absolute(path, base), options))
    return items


def dedupe(items: Iterable[WorkItem]) -> list[WorkItem]:
    """Each path once (the first entry wins), order kept."""
    seen: dict[str, WorkItem] = {}
    for item in items:
        seen.setdefault(item.path, item)
    return list(seen.values())


def discover(source: Path, defaults: GenerationOptions | None = None) -> list[WorkItem]:
    """The images named by `source`: a directory (recursive), a `.txt` or `.jsonl`
    manifest, or one image file."""
    defaults = defaults or GenerationOptions()
    if source.is_dir():
        items = [WorkItem(path, defaults) for path in scan_directory(source)]
    elif not source.exists():
        raise BulkIngestError(f"{source}: no such file or directory")
    elif source.suffix.lower() in (".txt", ".jsonl"):
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkIngestError(f"cannot read manifest {source}: {exc}") from exc
        base = Path(absolute(source)).parent
        if source.suffix.lower() == ".txt":
            items = parse_text_manifest(text, base, defaults)
        else:
            items = parse_jsonl_manifest(text, base, defaults, name=str(source))
    else:
        items = [WorkItem(absolute(source), defaults)]
    return dedupe(items)


# --- the journal ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A job submitted by an earlier (or this) run whose result is not in the output yet."""

    path: str
    job_id: str
    sha256: str

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "job_id": self.job_id, "sha256": self.sha256})


def pending_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".pending")


def _json_lines(text: str, what: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record
        else:
            log.warning("%s line %d is not a JSON object; ignoring it", what, number)


def parse_journal(text: str) -> dict[str, dict[str, Any]]:
    """path -> its line, for every path the output already has a terminal line for."""
    done: dict[str, dict[str, Any]] = {}
    for record in _json_lines(text, "output"):
        path, status = record.get("path"), record.get("status")
        if isinstance(path, str) and status in DONE_STATUSES:
            done.setdefault(path, record)
    return done


def parse_pending(text: str, done: Iterable[str] = ()) -> dict[str, PendingJob]:
    """path -> the job last submitted for it, for paths not done yet."""
    finished = set(done)
    pending: dict[str, PendingJob] = {}
    for record in _json_lines(text, "pending sidecar"):
        path, job_id, sha256 = record.get("path"), record.get("job_id"), record.get("sha256")
        if not (isinstance(path, str) and isinstance(job_id, str) and isinstance(sha256, str)):
            continue
        if path not in finished:
            pending[path] = PendingJob(path, job_id, sha256)
    return pending


def result_line(job: PendingJob, state: JobState) -> dict[str, Any]:
    """The output line of a job that reached a terminal state."""
    record: dict[str, Any] = {
        "path": job.path,
        "sha256": job.sha256,
        "job_id": job.job_id,
        "status": state.status.value,
    }
    if state.status is JobStatus.SUCCESS:
        record["caption"] = state.caption
    else:
        record["error"] = state.error
    return record


def rejected_line(path: str, error: str) -> dict[str, Any]:
    return {"path": path, "status": REJECTED, "error": error}


def _drop_torn_tail(path: Path) -> None:
    """A run killed mid-write can leave half a line at the end; cut it so that the next
    line starts on its own. (The torn line's job is still in the sidecar.)"""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s ends with a partial line; dropping it", path)
            fh.truncate(keep)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Journal:
    """The output file (results, appended and flushed line by line) and its sidecar of
    submitted-but-unfinished jobs (appended as jobs are accepted, compacted on close)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pending_path = pending_path_for(out)
        try:
            if out.exists():
                _drop_torn_tail(out)
            text = out.read_text(encoding="utf-8") if out.exists() else ""
            self.done = parse_journal(text)
            side = self.pending_path
            self.pending = parse_pending(
                side.read_text(encoding="utf-8") if side.exists() else "", self.done
            )
            self._out: IO[str] = out.open("a", encoding="utf-8")
            self._side: IO[str] = self.pending_path.open("a", encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkIngestError(f"cannot use {out} as the output: {exc}") from exc

    def record_result(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        self.done[record["path"]] = record
        self.pending.pop(record["path"], None)

    def record_submitted(self, job: PendingJob) -> None:
        self._side.write(job.to_json() + "\n")
        self._side.flush()
        self.pending[job.path] = job

    def close(self) -> None:
        """Close the output; leave a sidecar holding exactly the unfinished jobs, or none."""
        self._out.close()
        self._side.close()
        if self.pending:
            _atomic_write(
                self.pending_path, "".join(j.to_json() + "\n" for j in self.pending.values())
            )
        else:
            self.pending_path.unlink(missing_ok=True)


# --- waiting for results ----------------------------------------------------------------


@dataclass(slots=True)
class _Awaited:
    job: PendingJob
    since: float
    holds_slot: bool


class ResultWaiter:
    """The jobs this run waits for, fed with job states from the job-state topic.

    `on_done(job, state, holds_slot)` is called once per job, with its first terminal
    state (as the gateway's view, later states never replace it).
    """

    def __init__(self, on_done: Callable[[PendingJob, JobState, bool], None]) -> None:
        self._on_done = on_done
        self._awaited: dict[str, _Awaited] = {}

    def __len__(self) -> int:
        return len(self._awaited)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._awaited

    def expect(self, job: PendingJob, now: float, holds_slot: bool = True) -> None:
        self._awaited[job.job_id] = _Awaited(job, now, holds_slot)

    def forget(self, job_id: str) -> None:
        self._awaited.pop(job_id, None)

    def apply(self, state: JobState) -> bool:
        """Take one job state; True if it finished an awaited job."""
        if not state.status.terminal or state.job_id not in self._awaited:
            return False
        awaited = self._awaited.pop(state.job_id)
        self._on_done(awaited.job, state, awaited.holds_slot)
        return True

    def expire(self, now: float, timeout_s: float) -> list[tuple[PendingJob, bool]]:
        """Stop waiting for jobs awaited longer than `timeout_s`: (job, holds_slot)."""
        late = [a for a in self._awaited.values() if now - a.since > timeout_s]
        for awaited in late:
            del self._awaited[awaited.job.job_id]
        return [(a.job, a.holds_slot) for a in late]


def read_image_file(path: str, max_bytes: int) -> bytes:
    """The file's bytes; a file over the limit is refused without reading it."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise ImageTooLarge(f"image is {size} bytes; the limit is {max_bytes} bytes")
        return fh.read(max_bytes + 1)  # validation refuses it if it grew meanwhile


class _RegisteringPublisher:
    """Registers the job as awaited *before* its image event is published, so that a fast
    worker's terminal state can never be read before this run knows the job id."""

    def __init__(
        self,
        inner: JobPublisher,
        register: Callable[[ImageSubmitted], None],
        unregister: Callable[[str], None],
    ) -> None:
        self.inner = inner
        self.register = register
        self.unregister = unregister

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        self.register(event)
        try:
            await self.inner.publish_submission(state, event)
        except BaseException:
            self.unregister(event.job_id)
            raise


# --- progress ---------------------------------------------------------------------------


class Progress:
    """Two tqdm bars on stderr: images submitted and images finished, with rate and ETA.

    `enabled=None` shows them only when stderr is a terminal.
    """

    def __init__(
        self, *, to_submit: int, total: int, already_done: int, enabled: bool | None = None
    ) -> None:
        from tqdm import tqdm

        disable = None if enabled is None else not enabled
        self.counts: dict[str, int] = {s: 0 for s in sorted(DONE_STATUSES)}
        self.submitted_bar = tqdm(
            total=to_submit,
            desc="submitted",
            unit="img",
            position=0,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=disable,
        )
        self.finished_bar = tqdm(
            total=total,
            initial=already_done,
            desc="finished ",
            unit="img",
            position=1,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=disable,
        )

    def submitted(self) -> None:
        self.submitted_bar.update()

    def finished(self, status: str) -> None:
        self.counts[status] += 1
        self.finished_bar.set_postfix(
            ok=self.counts["SUCCESS"],
            failed=self.counts["FAILURE"],
            rejected=self.counts[REJECTED],
            refresh=False,
        )
        self.finished_bar.update()

    def close(self) -> None:
        self.submitted_bar.close()
        self.finished_bar.close()


# --- the run ----------------------------------------------------------------------------


@dataclass(slots=True)
class Summary:
    skipped: int = 0  # already done by an earlier run
    success: int = 0
    failure: int = 0
    rejected: int = 0
    timed_out: int = 0
    unfinished: int = 0  # left in the sidecar for a rerun
    interrupted_by: int | None = None  # the signal that stopped the run

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        return 1 if self.unfinished else 0


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

            def register(event: ImageSubmitted) -> None:
                job = PendingJob(item.path, event.job_id, event.sha256)
                self.waiter.expect(job, time.monotonic())

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
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("job-state fetch failed (%r); retrying", exc)
                await asyncio.sleep(1)
                continue
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
