"""Fetching an image by URL for a job, safely.

A URL from a client makes this service send a request, so every hop goes through the SSRF
guard (`ingest.address_guard`): http(s) only, no credentials, every address the host
resolves to public unless allow-listed, metadata endpoints never, and the connection to
the vetted address, never to a name resolved again. The request still carries the real
`Host` header, and for https the real name is sent as SNI and the certificate is verified
against it. Besides:
- redirects are followed by hand, at most `max_redirects`, each one vetted the same way;
- the body is read as it streams and the fetch is aborted once it passes `max_bytes`;
  connect, read and whole-fetch timeouts bound the time.

Not supported: fetching through an HTTP proxy. Proxy settings in the environment are
ignored on purpose, since a proxy would resolve names itself, after the vetting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from captionstream.errors import (
    AddressRefused,
    FetchError,
    FetchRefused,
    FetchTimeout,
    ImageTooLarge,
    RefusalReason,
)
from captionstream.ingest.address_guard import (
    AddressPolicy,
    IPAddress,
    IPNetwork,
    Resolver,
    VettedURL,
    system_resolver,
    vet_url,
)
from captionstream.settings import IngestSettings

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "captionstream/0.1 (image fetch for captioning)"


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    max_bytes: int
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_redirects: int = 3
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> FetchPolicy:
        return cls(
            max_bytes=settings.max_upload_bytes,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            allow_hosts=frozenset(settings.fetch_allow_hosts),
            allow_networks=tuple(settings.fetch_allow_networks),
        )

    @property
    def addresses(self) -> AddressPolicy:
        """The SSRF guard's part of this policy: the allow-list."""
        return AddressPolicy(self.allow_hosts, self.allow_networks)

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise `FetchRefused` unless `host` may be fetched at `ip`."""
        try:
            self.addresses.check_address(host, ip)
        except AddressRefused as exc:
            raise fetch_refusal(exc, host) from exc


def fetch_refusal(refused: AddressRefused, url: httpx.URL | str) -> FetchError:
    """The guard's refusal of `url` (an image URL or a redirect's; the host alone for an
    address), worded for the client who sent it: `FetchRefused` (400), or `FetchError`
    (502) when DNS failed."""
    shown = str(url)[:100]
    match refused.reason:
        case RefusalReason.SCHEME:
            return FetchRefused(f"only http and https URLs are fetched, not {shown!r}")
        case RefusalReason.CREDENTIALS:
            return FetchRefused("credentials in image URLs are not accepted")
        case RefusalReason.NO_HOST:
            return FetchRefused(f"URL {shown!r} has no host")
        case RefusalReason.UNKNOWN_HOST:
            return FetchRefused(f"unknown host {refused.host!r}")
        case RefusalReason.UNRESOLVABLE:
            return FetchError(f"cannot resolve {refused.host!r}: {refused.__cause__}")
        case _:
            return FetchRefused(f"refusing to fetch from {refused.explanation}")


class ImageFetcher:
    """Fetches image bytes under a `FetchPolicy`. One per app; `aclose()` at shutdown."""

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.policy = policy
        self.addresses = policy.addresses
        self.resolver = resolver
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=policy.connect_timeout_s,
                read=policy.read_timeout_s,
                write=policy.read_timeout_s,
                pool=policy.connect_timeout_s,
            ),
            follow_redirects=False,  # each hop is vetted here
            trust_env=False,  # no proxies or .netrc from the environment
            verify=verify,
            # No connection reuse: a pooled connection is keyed by IP, and reusing one
            # opened (and certificate-checked) for another host name would be wrong.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "image/*",
                # Raw bytes only: a compressed body could expand far beyond the cap
                # before it is counted.
                "Accept-Encoding": "identity",
            },
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (after redirects). Raises `FetchRefused` (400),
        `ImageTooLarge` (413), `FetchError` (502) or `FetchTimeout` (504)."""
        try:
            async with asyncio.timeout(self.policy.total_timeout_s):
                return await self._fetch(url)
        except TimeoutError as exc:
            raise FetchTimeout(
                f"fetching {url} took longer than {self.policy.total_timeout_s:g}s"
            ) from exc
        except httpx.TimeoutException as exc:
            raise FetchTimeout(f"fetching {url} timed out ({type(exc).__name__})") from exc
        except httpx.InvalidURL as exc:
            raise FetchRefused(f"invalid URL {url!r}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"fetching {url} failed: {type(exc).__name__}: {exc}") from exc

    async def _fetch(self, url: str) -> bytes:
        current = httpx.URL(url)
        for hop in range(self.policy.max_redirects + 1):
            target = await self._vet(current)
            async with self._open(target) as response:
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    if hop == self.policy.max_redirects:
                        raise FetchRefused(
                            f"{url} redirects more than {self.policy.max_redirects} times"
                        )
                    current = current.join(location)
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        f"{current} answered {response.status_code} {response.reason_phrase}"
                    )
                return await self._read_capped(response, current)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _vet(self, url: httpx.URL) -> VettedURL:
        try:
            return await vet_url(url, self.addresses, self.resolver)
        except AddressRefused as exc:
            raise fetch_refusal(exc, url) from exc

    @contextlib.asynccontextmanager
    async def _open(self, target: VettedURL) -> AsyncIterator[httpx.Response]:
        """GET `target.url` from its vetted addresses, in order, until one connects."""
        failures: list[str] = []
        for request in target.requests(self.client, "GET"):
            try:
                response = await self.client.send(request, stream=True)
            except httpx.ConnectError as exc:
                failures.append(f"{request.url.host}: {exc}")
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return
        raise FetchError(f"cannot connect to {target.host}: {'; '.join(failures)}")

    async def _read_capped(self, response: httpx.Response, url: httpx.URL) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"image at {url} is {declared} bytes; the limit is {limit} bytes")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise ImageTooLarge(f"image at {url} exceeds the limit of {limit} bytes")
        return bytes(body)
