"""The SSRF guard: which URLs this service may send a request to, and at which addresses.

Shared by image fetching (`ingest.fetch`) and webhooks (`gateway.webhooks`), since both
send requests to URLs a client chose:
- only `http` and `https`, no credentials in the URL, a host;
- the host is resolved here (off the event loop), and every address it resolves to must
  be public: loopback, private, link-local, multicast, reserved, unspecified and other
  non-global addresses, and the cloud metadata endpoints, are refused (IPv4 embedded in
  IPv6 - mapped, 6to4, NAT64 - is judged by the IPv4 address);
- the caller connects to the addresses vetted (`VettedURL.requests`), never to a name
  resolved again later, so DNS rebinding cannot swap in an internal address between
  check and use.

An allow-list (`AddressPolicy.allow_hosts`, `allow_networks`) lets tests and private
deployments reach non-public addresses; the metadata endpoints stay refused regardless.
A refusal is an `AddressRefused` carrying a `RefusalReason`, the host and the address:
each caller words it for its own users.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from captionstream.errors import AddressRefused, RefusalReason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata endpoints (AWS, GCP, Azure, OpenStack... share 169.254.169.254;
# AWS's IPv6 one is fd00:ec2::254). Refused even when an allow-list would admit them.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

SCHEMES = frozenset({"http", "https"})

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


def address_refusal(ip: IPAddress) -> RefusalReason | None:
    """Why no request may go to `ip` (before any allow-list), or None for a public
    address. An IPv6 address that embeds an IPv4 one is judged by that."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return address_refusal(inner)
    if ip in METADATA_ADDRESSES:
        return RefusalReason.METADATA_ADDRESS
    if ip.is_unspecified:
        return RefusalReason.UNSPECIFIED_ADDRESS
    if ip.is_loopback:
        return RefusalReason.LOOPBACK_ADDRESS
    if ip.is_link_local:
        return RefusalReason.LINK_LOCAL_ADDRESS
    if ip.is_multicast:
        return RefusalReason.MULTICAST_ADDRESS
    if ip.is_reserved:
        return RefusalReason.RESERVED_ADDRESS
    if ip.is_private:
        return RefusalReason.PRIVATE_ADDRESS
    if not ip.is_global:
        return RefusalReason.NON_PUBLIC_ADDRESS
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """`address_refusal` in words, e.g. `a loopback address (embedded 127.0.0.1)`."""
    reason = address_refusal(ip)
    if reason is None:
        return None
    inner = embedded_ipv4(ip)
    return str(reason) if inner is None else f"{reason} (embedded {inner})"


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which non-public addresses a deployment admits anyway (never the metadata ones)."""

    allow_hosts: frozenset[str] = frozenset()  # lower-case names or IP literals
    allow_networks: tuple[IPNetwork, ...] = ()

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise `AddressRefused` unless a request for `host` may go to `ip`."""
        reason = address_refusal(ip)
        if reason is None:
            return
        if reason is not RefusalReason.METADATA_ADDRESS and (
            host.lower() in self.allow_hosts
            or any(ip in network for network in self.allow_networks)
        ):
            return
        raise AddressRefused(reason, host, ip, embedded_ipv4(ip))


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
    url: httpx.URL, policy: AddressPolicy, resolver: Resolver = system_resolver
) -> VettedURL:
    """Check scheme, credentials and host of `url`, resolve it, and check every address
    under `policy`. Raises `AddressRefused`."""
    if url.scheme not in SCHEMES:
        raise AddressRefused(RefusalReason.SCHEME)
    if url.userinfo:
        raise AddressRefused(RefusalReason.CREDENTIALS)
    host = url.raw_host.decode("ascii")
    if not host:
        raise AddressRefused(RefusalReason.NO_HOST)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(resolver, host, port)
    for ip in addresses:
        policy.check_address(host, ip)
    return VettedURL(url, host, addresses)


async def _resolve(resolver: Resolver, host: str, port: int) -> list[IPAddress]:
    """The addresses of `host`; `UNKNOWN_HOST` when DNS says there is no such name,
    `UNRESOLVABLE` (the DNS error as the cause) when DNS itself failed."""
    try:
        addresses = await resolver(host, port)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
            raise AddressRefused(RefusalReason.UNKNOWN_HOST, host) from exc
        raise AddressRefused(RefusalReason.UNRESOLVABLE, host) from exc
    if not addresses:
        raise AddressRefused(RefusalReason.UNKNOWN_HOST, host)
    return addresses
