"""The project's exception hierarchy.

Exceptions carry policy as class attributes (`http_status`, `retriable`), so the code
that handles them reads an attribute instead of walking `isinstance` chains.
"""

from __future__ import annotations

import enum
import ipaddress


class CaptionstreamError(Exception):
    """Root of every error this project raises on purpose."""

    http_status: int = 500
    retriable: bool = False
    # For HTTP answers: seconds after which a retry may succeed (a `Retry-After` header).
    retry_after_s: int | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigurationError(CaptionstreamError):
    """A setting is missing or wrong; the message names the setting to change."""


class BrokerError(CaptionstreamError):
    """The Kafka broker could not be started or reached."""

    http_status = 503
    retriable = True
    # A partition leader that died is replaced within seconds (3.4-5.2 s measured on a
    # 3-node Apache Kafka, docs/kafka.md): a client that waits this long and retries
    # usually gets through.
    retry_after_s: int | None = 2


class KafkaAccessDenied(BrokerError):
    """Kafka's ACLs refuse this component's principal an operation it needs. A deployment
    error, not an outage: retrying does not help; the message names the operation and
    the resource to grant (`captionstream topics --grant`)."""

    retriable = False
    retry_after_s = None


class TopicMismatch(ConfigurationError):
    """An existing topic is not as planned (partitions, cleanup policy): no retry fixes
    it, the topic or the setting must change."""


# --- ingest ---------------------------------------------------------------------------


class ImageRejected(CaptionstreamError):
    """An upload that is not an acceptable image. Never retried."""

    http_status = 400


class UnsupportedImage(ImageRejected):
    """Not an image, or an image format the service does not accept."""

    http_status = 415


class ImageTooLarge(ImageRejected):
    """Too many bytes or too many pixels (decompression-bomb guard)."""

    http_status = 413


class BlobNotFound(CaptionstreamError):
    """An image reference that points at nothing (expired, deleted or forged)."""

    http_status = 404


class BlobStoreUnavailable(CaptionstreamError):
    """The blob store (an object store) failed a request it should have served: down,
    throttling, or refusing us. Retried; the message names the store and the cause."""

    http_status = 503
    retriable = True
    retry_after_s = 2


# --- processor ------------------------------------------------------------------------


class ModelLoadError(ConfigurationError):
    """The captioning model could not be loaded."""


class CaptioningError(CaptionstreamError):
    """Captioning one image failed."""


class ImageUnreadable(CaptioningError):
    """The stored image is missing or cannot be decoded: retrying cannot help."""


class InferenceError(CaptioningError):
    """The model failed on a batch; may succeed on a later attempt."""

    retriable = True


# --- the SSRF guard (ingest.address_guard): image URLs and webhooks -------------------


class RefusalReason(enum.StrEnum):
    """Why the SSRF guard refuses a URL, in words. The `*_ADDRESS` reasons concern an
    address the host is or resolves to; the others, the URL or its name."""

    SCHEME = "not http or https"
    CREDENTIALS = "credentials in the URL"
    NO_HOST = "no host"
    UNKNOWN_HOST = "unknown host"
    UNRESOLVABLE = "unresolvable host"  # DNS failed, rather than said there is no such name
    METADATA_ADDRESS = "a cloud metadata address"
    UNSPECIFIED_ADDRESS = "an unspecified address"
    LOOPBACK_ADDRESS = "a loopback address"
    LINK_LOCAL_ADDRESS = "a link-local address"
    MULTICAST_ADDRESS = "a multicast address"
    RESERVED_ADDRESS = "a reserved address"
    PRIVATE_ADDRESS = "a private address"
    NON_PUBLIC_ADDRESS = "not a public address"


class AddressRefused(CaptionstreamError):
    """A URL the SSRF guard will not let this service send a request to. Its callers
    (image fetching, webhooks) each word it for their users from the data: `reason`,
    `host`, the `address` refused (None when it did not come to addresses) and, for an
    IPv6 address judged by the IPv4 address it stands for, that `embedded` address."""

    http_status = 400

    def __init__(
        self,
        reason: RefusalReason,
        host: str | None = None,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        embedded: ipaddress.IPv4Address | None = None,
    ) -> None:
        self.reason = reason
        self.host = host
        self.address = address
        self.embedded = embedded
        super().__init__(f"URL refused: {self.explanation}")

    @property
    def explanation(self) -> str:
        """The refusal naming its host and address, e.g. `hooks.internal (10.0.0.7): a
        private address`, `::ffff:127.0.0.1: a loopback address (embedded 127.0.0.1)`,
        `unknown host 'x.invalid'`."""
        if self.address is None:
            return str(self.reason) if self.host is None else f"{self.reason} {self.host!r}"
        if self.reason is RefusalReason.METADATA_ADDRESS:
            return f"{self.host}: {self.address} is {self.reason}"
        shown = self.host if self.host == str(self.address) else f"{self.host} ({self.address})"
        inner = "" if self.embedded is None else f" (embedded {self.embedded})"
        return f"{shown}: {self.reason}{inner}"


# --- fetching images by URL -----------------------------------------------------------


class FetchError(CaptionstreamError):
    """An image URL could not be fetched: the upstream failed or answered an error."""

    http_status = 502


class FetchRefused(FetchError):
    """An image URL this service will not fetch: scheme, credentials, an address that is
    not public (SSRF guard), an unknown host, or too many redirects."""

    http_status = 400


class FetchTimeout(FetchError):
    """The upstream did not answer, or not completely, in time."""

    http_status = 504


class WebhookRefused(CaptionstreamError):
    """A `webhook_url` this service will not call: webhooks off, not http(s),
    credentials in it, or an address that is not public (the SSRF guard of fetching)."""

    http_status = 400


class IdempotencyConflict(CaptionstreamError):
    """An Idempotency-Key reused for a different request."""

    http_status = 409


# --- access control -------------------------------------------------------------------


class Unauthorized(CaptionstreamError):
    """A request to the API without a valid API key (when keys are configured)."""

    http_status = 401


class RateLimited(CaptionstreamError):
    """A client over its submission rate; `retry_after_s` (whole seconds) says when the
    next submission will be accepted."""

    http_status = 429
    retriable = True

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
