"""Fetching an image by URL for a job, safely.

A URL from a client makes this service send a request, so the fetch is guarded against
server-side request forgery (SSRF):
- only `http` and `https`, no credentials in the URL;
- the host is resolved here (off the event loop), and every address it resolves to must
  be public: loopback, private, link-local, multicast, reserved, unspecified and other
  non-global addresses, and the cloud metadata endpoints, are refused (IPv4 embedded in
  IPv6 - mapped, 6to4, NAT64 - is judged by the IPv4 address);
- the connection goes to the address that was vetted, never to a name resolved again
  later, so DNS rebinding cannot swap in an internal address between check and use. The
  request still carries the real `Host` header, and for https the real name is sent as
  SNI and the certificate is verified against it;
- redirects are followed by hand, at most `max_redirects`, each one vetted the same way;
- the body is read as it streams and the fetch is aborted once it passes `max_bytes`;
  connect, read and whole-fetch timeouts bound the time.

An allow-list (`allow_hosts`, `allow_networks`) lets tests and private deployments
fetch from non-public addresses; the metadata endpoints stay refused regardless.

Not supported: fetching through an HTTP proxy. Proxy settings in the environment are
ignored on purpose, since a proxy would resolve names itself, after the vetting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from captionstream.errors import FetchError, FetchRefused, FetchTimeout, ImageTooLarge
from captionstream.settings import IngestSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata endpoints (AWS, GCP, Azure, OpenStack... share 169.254.169.254;
# AWS's IPv6 one is fd00:ec2::254). Refused even when an allow-list would admit them.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

SCHEMES = frozenset({"http", "https"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "captionstream/0.1 (image fetch for captioning)"

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from, or None for a public address."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = refusal_reason(inner)
        return None if reason is None else f"{reason} (embedded {inner})"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


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

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise `FetchRefused` unless `host` may be fetched at `ip`."""
        if ip in METADATA_ADDRESSES or embedded_ipv4(ip) in METADATA_ADDRESSES:
            raise FetchRefused(f"refusing to fetch from {host}: {ip} is a cloud metadata address")
        reason = refusal_reason(ip)
        if reason is None or host.lower() in self.allow_hosts:
            return
        if any(ip in network for network in self.allow_networks):
            return
        shown = host if host == str(ip) else f"{host} ({ip})"
        raise FetchRefused(f"refusing to fetch from {shown}: {reason}")


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The addresses of `host`, in the system's preference order (getaddrinfo, run in the
    loop's executor so a slow DNS server never blocks the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


@dataclass(frozen=True, slots=True)
class VettedURL:
    """A URL whose every address passed the policy: connect only to `addresses`."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    addresses: Sequence[IPAddress]

    def requests(
        self, client: httpx.AsyncClient, method: str, **kwargs: Any
    ) -> Iterator[httpx.Request]:
        """One request per vetted address, in order, each aimed at the address itself
        (never at a name resolved again), with the real `Host` header and, for https,
        the real name as SNI (the certificate is verified against it)."""
        headers = {**kwargs.pop("headers", {}), "Host": self.url.netloc.decode("ascii")}
        extensions = {"sni_hostname": self.host} if self.url.scheme == "https" else {}
        for ip in self.addresses:
            yield client.build_request(
                method,
                self.url.copy_with(host=str(ip)),
                headers=headers,
                extensions=extensions,
                **kwargs,
            )


async def vet_url(
    url: httpx.URL, policy: FetchPolicy, resolver: Resolver = system_resolver
) -> VettedURL:
    """Check scheme, credentials and host of `url`, resolve it, and check every address
    under `policy`. Raises `FetchRefused` (or `FetchError` when DNS itself fails)."""
    if url.scheme not in SCHEMES:
        raise FetchRefused(f"only http and https URLs are fetched, not {str(url)[:100]!r}")
    if url.userinfo:
        raise FetchRefused("credentials in image URLs are not accepted")
    host = url.raw_host.decode("ascii")
    if not host:
        raise FetchRefused(f"URL {str(url)[:100]!r} has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(resolver, host, port)
    for ip in addresses:
        policy.check_address(host, ip)
    return VettedURL(url, host, addresses)


async def _resolve(resolver: Resolver, host: str, port: int) -> list[IPAddress]:
    try:
        addresses = await resolver(host, port)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
            raise FetchRefused(f"unknown host {host!r}") from exc
        raise FetchError(f"cannot resolve {host!r}: {exc}") from exc
    if not addresses:
        raise FetchRefused(f"unknown host {host!r}")
    return addresses


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
        return await vet_url(url, self.policy, self.resolver)

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
