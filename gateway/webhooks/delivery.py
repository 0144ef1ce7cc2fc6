"""Sending one finished job's webhook: the signed POST to the vetted address, retried
with backoff and jitter on network errors, 5xx, 408 and 429 (`Retry-After` honoured up to
the cap), given up on any other answer or when the URL no longer passes the guard."""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from captionstream.errors import WebhookRefused
from captionstream.gateway.metrics import GatewayMetrics
from captionstream.gateway.webhooks.guard import WebhookGuard
from captionstream.ingest.address_guard import VettedURL
from captionstream.logging_config import job_context
from captionstream.schemas.events import JobState, utcnow
from captionstream.schemas.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    JobFinishedWebhook,
    sign,
)
from captionstream.settings import GatewaySettings

log = logging.getLogger(__name__)

USER_AGENT = "captionstream-webhooks/1"
RETRY_STATUSES = frozenset({408, 429})


# --- the retry policy -----------------------------------------------------------------


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


# --- sending --------------------------------------------------------------------------


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
            # another host name (see ingest.address_guard).
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
