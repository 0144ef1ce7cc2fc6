"""The SSRF guard on its own: structured refusals (reason, host, address) for schemes,
names and addresses, the allow-list, and resolution, with fake resolvers (no network)."""

from __future__ import annotations

import ipaddress
import socket

import httpx
import pytest

from captionstream.errors import AddressRefused, RefusalReason
from captionstream.ingest.address_guard import (
    AddressPolicy,
    IPAddress,
    Resolver,
    address_refusal,
    refusal_reason,
    vet_url,
)

ip = ipaddress.ip_address
R = RefusalReason


def resolver_to(*ips: str, calls: list[str] | None = None) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(f"{host}:{port}")
        return [ip(address) for address in ips]

    return resolve


def failing(errno: int) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(errno, f"lookup failed ({errno})")

    return resolve


async def refusal(
    url: str, resolver: Resolver, policy: AddressPolicy | None = None
) -> AddressRefused:
    with pytest.raises(AddressRefused) as refused:
        await vet_url(httpx.URL(url), policy or AddressPolicy(), resolver)
    return refused.value


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("93.184.216.34", None),
        ("127.0.0.1", R.LOOPBACK_ADDRESS),
        ("10.0.0.7", R.PRIVATE_ADDRESS),
        ("169.254.1.1", R.LINK_LOCAL_ADDRESS),
        ("224.0.0.1", R.MULTICAST_ADDRESS),
        ("0.0.0.0", R.UNSPECIFIED_ADDRESS),
        ("240.0.0.1", R.RESERVED_ADDRESS),
        ("100.64.0.1", R.NON_PUBLIC_ADDRESS),
        ("169.254.169.254", R.METADATA_ADDRESS),
        ("::ffff:169.254.169.254", R.METADATA_ADDRESS),
        ("64:ff9b::a00:1", R.PRIVATE_ADDRESS),  # NAT64 of 10.0.0.1
    ],
)
def test_each_kind_of_address_has_its_reason(address: str, reason: RefusalReason | None) -> None:
    assert address_refusal(ip(address)) is reason
    words = refusal_reason(ip(address))  # the same, in words
    if reason is None:
        assert words is None
    else:
        assert words is not None
        assert words.startswith(str(reason))


def test_a_refused_address_carries_host_address_and_the_embedded_ipv4() -> None:
    with pytest.raises(AddressRefused) as refused:
        AddressPolicy().check_address("hooks.internal", ip("::ffff:127.0.0.1"))
    got = refused.value
    assert (got.reason, got.host, got.address) == (
        R.LOOPBACK_ADDRESS,
        "hooks.internal",
        ip("::ffff:127.0.0.1"),
    )
    assert got.embedded == ip("127.0.0.1")
    mapped = ip("::ffff:127.0.0.1")  # shown as ::ffff:7f00:1 before Python 3.13
    assert got.explanation == (
        f"hooks.internal ({mapped}): a loopback address (embedded 127.0.0.1)"
    )
    assert got.http_status == 400


def test_the_allow_list_admits_hosts_and_networks_but_never_metadata() -> None:
    policy = AddressPolicy(
        allow_hosts=frozenset({"hooks.internal"}),
        allow_networks=(ipaddress.ip_network("0.0.0.0/0"),),
    )
    policy.check_address("HOOKS.internal", ip("::1"))  # host allowed, any case
    policy.check_address("other.internal", ip("10.1.2.3"))  # network allowed
    with pytest.raises(AddressRefused) as refused:
        policy.check_address("hooks.internal", ip("169.254.169.254"))
    assert refused.value.reason is R.METADATA_ADDRESS
    assert refused.value.explanation == (
        "hooks.internal: 169.254.169.254 is a cloud metadata address"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example.com/x", R.SCHEME),
        ("file:///etc/passwd", R.SCHEME),
        ("https://user:pw@hooks.example.com/x", R.CREDENTIALS),
        ("http:///nohost", R.NO_HOST),
    ],
)
async def test_the_url_itself_is_checked_before_any_lookup(url: str, reason: RefusalReason) -> None:
    calls: list[str] = []
    refused = await refusal(url, resolver_to("93.184.216.34", calls=calls))
    assert (refused.reason, refused.host, refused.address) == (reason, None, None)
    assert calls == []


async def test_an_unknown_host_and_a_failed_lookup_are_told_apart() -> None:
    for resolver in (failing(socket.EAI_NONAME), resolver_to()):
        unknown = await refusal("http://nowhere.invalid/", resolver)
        assert (unknown.reason, unknown.host) == (R.UNKNOWN_HOST, "nowhere.invalid")
        assert unknown.explanation == "unknown host 'nowhere.invalid'"
    broken = await refusal("http://flaky.example/", failing(socket.EAI_AGAIN))
    assert (broken.reason, broken.host) == (R.UNRESOLVABLE, "flaky.example")
    assert isinstance(broken.__cause__, socket.gaierror), "the DNS error, for the message"


async def test_every_resolved_address_must_pass() -> None:
    refused = await refusal("https://mixed.example/", resolver_to("93.184.216.34", "10.0.0.7"))
    assert (refused.reason, refused.host, refused.address) == (
        R.PRIVATE_ADDRESS,
        "mixed.example",
        ip("10.0.0.7"),
    )


async def test_a_public_name_is_vetted_with_its_addresses() -> None:
    calls: list[str] = []
    vetted = await vet_url(
        httpx.URL("https://hooks.example.com/x"),
        AddressPolicy(),
        resolver_to("93.184.216.34", "2606:4700:4700::1111", calls=calls),
    )
    assert calls == ["hooks.example.com:443"]
    assert (vetted.host, list(vetted.addresses)) == (
        "hooks.example.com",
        [ip("93.184.216.34"), ip("2606:4700:4700::1111")],
    )


async def test_an_ip_literal_is_not_resolved() -> None:
    calls: list[str] = []
    vetted = await vet_url(
        httpx.URL("http://[2606:4700:4700::1111]:8080/"), AddressPolicy(), resolver_to(calls=calls)
    )
    assert calls == []
    assert list(vetted.addresses) == [ip("2606:4700:4700::1111")]
