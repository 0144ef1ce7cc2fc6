"""Which `webhook_url`s this service will call: the SSRF guard of `ingest.address_guard`
under the webhook allow-list, at submission and again before every attempt."""

from __future__ import annotations

import asyncio

import httpx

from captionstream.errors import AddressRefused, RefusalReason, WebhookRefused
from captionstream.ingest.address_guard import (
    AddressPolicy,
    Resolver,
    VettedURL,
    system_resolver,
    vet_url,
)
from captionstream.settings import GatewaySettings


def webhook_refusal(refused: AddressRefused, shown: str) -> WebhookRefused:
    """The guard's refusal of the `webhook_url` `shown`, worded for the client who sent it."""
    match refused.reason:
        case RefusalReason.SCHEME:
            return WebhookRefused(f"webhook_url must be http or https, not {shown!r}")
        case RefusalReason.CREDENTIALS:
            return WebhookRefused(
                "credentials in webhook_url are not accepted (webhooks are signed instead)"
            )
        case RefusalReason.NO_HOST:
            return WebhookRefused(f"webhook_url refused: URL {shown!r} has no host")
        case RefusalReason.UNRESOLVABLE:
            return WebhookRefused(
                f"webhook_url refused: cannot resolve {refused.host!r}: {refused.__cause__}"
            )
        case RefusalReason.UNKNOWN_HOST:
            return WebhookRefused(f"webhook_url refused: {refused.explanation}")
        case _:
            return WebhookRefused(f"webhook_url refused: refusing to call {refused.explanation}")


class WebhookGuard:
    """Vets webhook URLs at submission and again before every attempt."""

    def __init__(self, settings: GatewaySettings, resolver: Resolver = system_resolver) -> None:
        self.enabled = settings.webhooks_enabled
        self.policy = AddressPolicy(
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
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                return await vet_url(parsed, self.policy, self.resolver)
        except TimeoutError as exc:
            raise WebhookRefused(f"webhook_url host of {shown!r} did not resolve in time") from exc
        except AddressRefused as exc:
            raise webhook_refusal(exc, shown) from exc

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
