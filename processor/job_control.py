"""Job control as plain functions on table-like mappings (no Faust, no Kafka): clients'
cancellation requests, and the expiry of finished jobs.

- A cancellation request is remembered in the `cancelled` table; the captioning batch
  honours it for a job that has not started (`pipeline.handle_batch`).
- A job expires `job_ttl_s` after it finished. The janitor (`request_expiries`, on a
  timer) asks for it on the job-control topic, keyed by job id: the request lands on the
  job's partition, where Faust can write the job's tables. `JobControlHandler.expire`
  then deletes its state from both tables, tombstones it for the gateways, and deletes
  its image unless a job stored that image again within the TTL.

The tables are keyed by job id (UTF-8): Faust tables in the worker, dicts in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from captionstream.errors import CaptionstreamError
from captionstream.ingest.blobstore import BlobStore
from captionstream.schemas.events import (
    EventDecodeError,
    JobCancelRequested,
    JobExpiryDue,
    decode_job_control,
    decode_job_state,
)

log = logging.getLogger(__name__)

JobTable = MutableMapping[bytes, bytes]


@contextlib.asynccontextmanager
async def no_unit_of_work() -> AsyncIterator[None]:
    yield


def remember_cancellation(request: JobCancelRequested, cancelled: JobTable) -> None:
    """Record when the client asked, for the captioning batch to see."""
    cancelled[request.job_id.encode()] = request.requested_at.isoformat().encode()
    log.info("job %s: cancellation requested", request.job_id)


def forget_job_state(job_id: str, jobs: JobTable, cancelled: JobTable) -> bool:
    """Delete the job from both tables; False if it was gone already (the janitor may ask
    twice, and a request may be redelivered)."""
    key = job_id.encode()
    if jobs.get(key) is None:
        return False
    del jobs[key]
    if cancelled.get(key) is not None:
        del cancelled[key]
    return True


@dataclass(frozen=True, slots=True)
class JobControlHandler:
    """Carries out the job-control topic's requests on the worker's tables.

    `publish_tombstone` tells the gateways a job is gone (a tombstone on the compacted
    job-state topic); `unit_of_work` keeps a deletion's table writes and tombstone in one
    commit (processor.transport.UnitOfWork).
    """

    jobs: JobTable
    cancelled: JobTable
    publish_tombstone: Callable[[str], Awaitable[None]]
    blobs: BlobStore
    job_ttl_s: float
    unit_of_work: Callable[[], AbstractAsyncContextManager[None]] = no_unit_of_work

    async def handle(self, raw: bytes | None) -> None:
        """One request as read from the topic; a malformed one is logged and skipped."""
        try:
            request = decode_job_control(raw)
        except EventDecodeError as exc:
            log.error("ignoring a malformed job-control request: %s", exc)
            return
        if isinstance(request, JobCancelRequested):
            remember_cancellation(request, self.cancelled)
        else:
            await self.expire(request)

    async def expire(self, request: JobExpiryDue) -> bool:
        """Delete the job's state everywhere and its image if unused; False (and nothing
        done) if the job was deleted already."""
        async with self.unit_of_work():
            if not forget_job_state(request.job_id, self.jobs, self.cancelled):
                return False
            await self.publish_tombstone(request.job_id)
        if request.image_ref is not None:
            # Unless a job stored the image (again) within the TTL: a newer job with the
            # same picture still needs it.
            try:
                await asyncio.to_thread(
                    self.blobs.delete_if_idle_sync, request.image_ref, self.job_ttl_s
                )
            except CaptionstreamError as exc:  # an object store down: not the worker's end
                log.warning("job %s: image not deleted: %s", request.job_id, exc.detail)
        log.info("job %s expired and deleted", request.job_id)
        return True


def expired_jobs(
    jobs: Mapping[bytes, bytes], now: datetime, ttl_s: float
) -> Iterator[tuple[bytes, JobExpiryDue]]:
    """The expiry requests (keyed as the table) of jobs that finished more than `ttl_s`
    before `now`. Jobs not finished never expire."""
    cutoff = now - timedelta(seconds=ttl_s)
    for key, raw in list(jobs.items()):
        state = decode_job_state(raw)
        if state.finished_at is not None and state.finished_at < cutoff:
            yield key, JobExpiryDue(job_id=state.job_id, image_ref=state.image_ref, due_at=now)


async def request_expiries(
    jobs: Mapping[bytes, bytes],
    *,
    now: datetime,
    ttl_s: float,
    send: Callable[[bytes, bytes], Awaitable[object]],
) -> int:
    """The janitor: ask, through `send` (to the job-control topic), for the deletion of
    every job of `jobs` that expired by `now`; how many were asked for."""
    asked = 0
    for key, due in expired_jobs(jobs, now, ttl_s):
        await send(key, due.model_dump_json().encode())
        asked += 1
    return asked
