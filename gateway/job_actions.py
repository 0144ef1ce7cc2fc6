"""What the jobs API does, apart from parsing requests: accept a submission, cancel a
pending job, find a job. The route handlers in `gateway.routes.jobs` call these.

Kafka failures become `BrokerError` (503, `Retry-After`) saying what did not happen:
nothing is half-accepted, so the client may simply retry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiokafka.errors import KafkaError
from fastapi import HTTPException, status

from captionstream.errors import BrokerError
from captionstream.gateway.idempotency import earlier_job
from captionstream.gateway.routes import API_PREFIX
from captionstream.gateway.state import GatewayState, KafkaSide
from captionstream.gateway.view import JobView
from captionstream.ingest.submission import submit_image
from captionstream.logging_config import job_context
from captionstream.schemas.api import JobAccepted
from captionstream.schemas.events import GenerationOptions, JobState, JobStatus

log = logging.getLogger(__name__)


@contextlib.contextmanager
def kafka_unavailable(what_failed: str) -> Iterator[None]:
    """Turn an aiokafka error into a 503 whose detail starts with `what_failed`."""
    try:
        yield
    except KafkaError as exc:
        raise BrokerError(f"{what_failed}, Kafka is unavailable: {exc}") from exc


def status_url(job_id: str) -> str:
    return f"{API_PREFIX}/status/{job_id}"


def known_job(view: JobView, job_id: str) -> JobState:
    """The job's state, or 404."""
    state = view.get(job_id)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")
    return state


@dataclass(frozen=True, slots=True)
class Accepted:
    """A submission's answer: the job, and whether an Idempotency-Key retry returned an
    earlier one instead of creating it."""

    job: JobAccepted
    replayed: bool = False

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Location": status_url(self.job.job_id)}
        if self.replayed:
            headers["Idempotent-Replayed"] = "true"
        return headers


async def submit_job(
    gateway: GatewayState,
    kafka: KafkaSide,
    image: bytes | Callable[[], Awaitable[bytes]],
    *,
    source: str,
    filename: str | None,
    options: GenerationOptions,
    webhook_url: str | None,
    idempotency_key: str | None,
    digest: str,
) -> Accepted:
    """Return the job an earlier request with the same `idempotency_key` created, or
    accept a new one: vet the webhook URL, get the image (`image` may be a fetch, which
    comes after the cheaper checks), validate, store and publish it (or answer from the
    caption cache), the same for every way an image arrives.

    `source` labels the job in logs and metrics (`upload`, `url`); `digest` is the
    request's `gateway.idempotency.request_digest`.
    """
    async with earlier_job(gateway.view, idempotency_key, digest) as earlier:
        if earlier is not None:
            job = JobAccepted(
                job_id=earlier.job_id, status=earlier.status, submitted_at=earlier.submitted_at
            )
            return Accepted(job, replayed=True)
        vetted_webhook_url = await gateway.webhooks.check_submission(webhook_url)
        data = image if isinstance(image, bytes) else await image()
        with kafka_unavailable("job not accepted"):
            state, _ = await submit_image(
                data,
                filename,
                limits=gateway.limits,
                blobs=gateway.blobs,
                publisher=kafka.publisher,
                options=options,
                idempotency_key=idempotency_key,
                request_digest=digest if idempotency_key else None,
                cache=kafka.cache,
                webhook_url=vetted_webhook_url,
            )
        # In the view before the key's lock is released, so a retry finds the job; other
        # replicas see it from the topic.
        gateway.view.apply(state)
    log.info("job %s accepted (%s)", state.job_id, source, extra=job_context(state.job_id))
    gateway.metrics.jobs_submitted.labels(source).inc()
    return Accepted(
        JobAccepted(
            job_id=state.job_id,
            status=state.status,
            submitted_at=state.submitted_at,
            cache_hit=state.cached_from is not None,
        )
    )


async def request_cancellation(view: JobView, kafka: KafkaSide, job_id: str) -> JobState:
    """Ask the workers to cancel a PENDING job (409 once it has started or finished);
    return its current state."""
    state = known_job(view, job_id)
    if state.status is not JobStatus.PENDING:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id!r} is {state.status.value}: only a PENDING job can be cancelled",
        )
    with kafka_unavailable("cancellation not recorded"):
        await kafka.publisher.publish_cancel_request(job_id)
    return state
