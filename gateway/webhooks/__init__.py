"""Webhooks: a job's `webhook_url` gets a signed POST once the job is SUCCESS or FAILURE.

- Submission (`guard`): `WebhookGuard.check_submission` vets the URL with the SSRF guard
  of image fetching (`ingest.address_guard`: http/https, no credentials, every resolved
  address public unless allow-listed by `WEBHOOK_ALLOW_HOSTS` / `_NETWORKS`, metadata
  addresses never). Webhooks are on only with `CAPTIONSTREAM_WEBHOOK_SECRET`: without it
  a `webhook_url` is refused (400) rather than called unsigned, because a receiver could
  not tell our calls from forged ones, and a URL accepted but never called would be worse.
- Delivery (`dispatcher`, `offsets`): `WebhookDispatcher` reads the compacted job-state
  topic in a consumer group (`WEBHOOK_GROUP_ID`), so with several gateway replicas each
  partition, and so each finished job, is handled by one of them. At-least-once: a
  partition's offset is committed only up to its lowest record whose webhook is not
  finished (delivered or given up), so a crash redelivers; receivers drop duplicates by
  `event_id`. Deliveries run concurrently (at most `WEBHOOK_MAX_IN_FLIGHT`, then
  fetching pauses), so a slow receiver delays only its own webhook.
- Sending (`delivery`): each attempt vets the URL again (DNS may have changed since
  submission) and connects to the vetted address; redirects are not followed. Network
  errors, 5xx, 408 and 429 are retried with exponential backoff and jitter
  (`Retry-After` honoured up to the cap), at most `WEBHOOK_MAX_ATTEMPTS` attempts; any
  other answer ends the delivery.

The pure parts (backoff, answer classification, `Retry-After`, offset bookkeeping, which
terminal state to deliver) are plain functions and classes; the payload and signature
are in `schemas.webhooks`.
"""

from captionstream.gateway.webhooks.delivery import (
    Attempt,
    Verdict,
    WebhookSender,
    backoff_delay,
    classify,
    parse_retry_after,
    retry_delay,
)
from captionstream.gateway.webhooks.dispatcher import FinishedJobs, WebhookDispatcher
from captionstream.gateway.webhooks.guard import WebhookGuard
from captionstream.gateway.webhooks.offsets import OffsetTracker, PartitionOffsets

__all__ = [
    "Attempt",
    "FinishedJobs",
    "OffsetTracker",
    "PartitionOffsets",
    "Verdict",
    "WebhookDispatcher",
    "WebhookGuard",
    "WebhookSender",
    "backoff_delay",
    "classify",
    "parse_retry_after",
    "retry_delay",
]
