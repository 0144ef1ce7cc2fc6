"""Fetching images by URL: address classification, schemes, redirects, size and time
limits, and connecting to the vetted address, against real HTTP(S) servers on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from captionstream.errors import FetchError, FetchRefused, FetchTimeout, ImageTooLarge
from captionstream.ingest.address_guard import IPAddress, refusal_reason
from captionstream.ingest.fetch import FetchPolicy, ImageFetcher
from captionstream.settings import IngestSettings
from tests.helpers.images import make_png

PNG = make_png(32, 24)
LOOPBACK = frozenset({"127.0.0.1"})


# --- a small real HTTP server ---------------------------------------------------------


@dataclass
class Upstream:
    """What the test server saw and sent."""

    host_headers: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    bytes_sent: int = 0
    aborted: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    upstream: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_body(self, body: bytes, content_type: str = "image/png", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        up = self.upstream
        up.host_headers.append(self.headers.get("Host", ""))
        up.paths.append(self.path)
        path = self.path
        if path == "/cat.png":
            self.send_body(PNG)
        elif path.startswith("/hops/"):  # /hops/N: N more redirects, then the image
            left = int(path.rsplit("/", 1)[1])
            self.redirect(f"/hops/{left - 1}" if left > 0 else "/cat.png")
        elif path.startswith("/redirect?to="):
            self.redirect(path.split("=", 1)[1])
        elif path == "/missing":
            self.send_body(b"no such image", "text/plain", status=404)
        elif path == "/page":
            self.send_body(b"<html>not an image</html>", "text/html")
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/endless":  # chunked, no length: only counting can stop it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                for _ in range(2000):  # 128 MiB if nobody stops reading
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    up.bytes_sent += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                up.aborted.set()
        elif path == "/slow-headers":
            time.sleep(2)
            self.send_body(PNG)
        elif path == "/dribble":  # a byte at a time, each well within the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for byte in PNG:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                up.aborted.set()
        else:
            self.send_body(b"?", "text/plain", status=404)


@dataclass
class Server:
    port: int
    upstream: Upstream
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    upstream = Upstream()
    handler = type("BoundHandler", (Handler,), {"upstream": upstream})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(httpd.server_address[1], upstream, "https" if tls else "http")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


def fetcher(max_bytes: int = 1 << 20, **policy: object) -> ImageFetcher:
    policy.setdefault("allow_hosts", LOOPBACK)
    return ImageFetcher(FetchPolicy(max_bytes=max_bytes, **policy))  # type: ignore[arg-type]


async def fetch(url: str, max_bytes: int = 1 << 20, **policy: object) -> bytes:
    client = fetcher(max_bytes, **policy)
    try:
        return await client.fetch(url)
    finally:
        await client.aclose()


# --- address classification -----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("::ffff:127.0.0.1", "loopback address (embedded 127.0.0.1)"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("2002:7f00:1::", "loopback address (embedded 127.0.0.1)"),  # 6to4
        ("64:ff9b::a00:1", "private address (embedded 10.0.0.1)"),  # NAT64
        ("64:ff9b::808:808", None),  # NAT64 of a public address
    ],
)
def test_refusal_reason(address: str, reason: str | None) -> None:
    got = refusal_reason(ipaddress.ip_address(address))
    if reason is None:
        assert got is None
    else:
        assert got is not None
        assert reason in got


def test_allow_list_admits_hosts_and_networks_but_never_metadata() -> None:
    policy = FetchPolicy(
        max_bytes=1,
        allow_hosts=frozenset({"images.internal"}),
        allow_networks=(ipaddress.ip_network("10.9.0.0/16"),),
    )
    ip = ipaddress.ip_address
    policy.check_address("images.internal", ip("192.168.7.7"))  # host allowed
    policy.check_address("anything.example", ip("10.9.1.2"))  # network allowed
    policy.check_address("public.example", ip("93.184.215.14"))
    with pytest.raises(FetchRefused, match=r"other\.internal \(10\.8\.1\.2\): a private"):
        policy.check_address("other.internal", ip("10.8.1.2"))
    for metadata in ("169.254.169.254", "fd00:ec2::254"):
        with pytest.raises(FetchRefused, match="metadata"):
            policy.check_address("images.internal", ip(metadata))
    wide_open = FetchPolicy(max_bytes=1, allow_networks=(ipaddress.ip_network("0.0.0.0/0"),))
    with pytest.raises(FetchRefused, match="metadata"):
        wide_open.check_address("169.254.169.254", ip("169.254.169.254"))


def test_policy_from_comma_separated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_FETCH_ALLOW_HOSTS", " 127.0.0.1, Images.Internal,[::1]")
    monkeypatch.setenv("CAPTIONSTREAM_FETCH_ALLOW_NETWORKS", "10.9.0.0/16,fd12::/16")
    monkeypatch.setenv("CAPTIONSTREAM_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("CAPTIONSTREAM_FETCH_MAX_REDIRECTS", "1")
    policy = FetchPolicy.from_settings(IngestSettings())
    assert policy.allow_hosts == {"127.0.0.1", "images.internal", "::1"}
    assert policy.allow_networks == (
        ipaddress.ip_network("10.9.0.0/16"),
        ipaddress.ip_network("fd12::/16"),
    )
    assert (policy.max_bytes, policy.max_redirects) == (1234, 1)
    monkeypatch.delenv("CAPTIONSTREAM_FETCH_ALLOW_HOSTS")
    monkeypatch.delenv("CAPTIONSTREAM_FETCH_ALLOW_NETWORKS")
    empty = FetchPolicy.from_settings(IngestSettings())
    assert (empty.allow_hosts, empty.allow_networks) == (frozenset(), ())


# --- schemes and addresses, on the wire -----------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/cat.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "/relative/path.png",
    ],
)
async def test_only_http_and_https(url: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        await fetch(url)
    assert refused.value.http_status == 400


async def test_credentials_in_the_url_are_refused(server: Server) -> None:
    with pytest.raises(FetchRefused, match="credentials"):
        await fetch(server.url("/cat.png", host="user:secret@127.0.0.1"))
    assert server.upstream.paths == []


async def test_allowed_loopback_is_fetched(server: Server) -> None:
    assert await fetch(server.url("/cat.png")) == PNG
    assert server.upstream.host_headers == [f"127.0.0.1:{server.port}"]


async def test_loopback_is_refused_without_the_allow_list(server: Server) -> None:
    for host in ("127.0.0.1", "localhost", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]"):
        with pytest.raises(FetchRefused, match="loopback") as refused:
            await fetch(server.url("/cat.png", host=host), allow_hosts=frozenset())
        assert refused.value.http_status == 400
    assert server.upstream.paths == [], "nothing was sent to a refused address"


async def test_allowed_network_admits_loopback(server: Server) -> None:
    network = (ipaddress.ip_network("127.0.0.0/8"),)
    data = await fetch(
        server.url("/cat.png", host="localhost"), allow_hosts=frozenset(), allow_networks=network
    )
    assert data == PNG


async def test_unknown_host_is_a_bad_request() -> None:
    with pytest.raises(FetchRefused, match="unknown host"):
        await fetch("http://no-such-host.invalid/cat.png")


async def test_a_failed_lookup_is_a_bad_gateway_not_a_refusal() -> None:
    """DNS that fails (rather than says there is no such name) is the upstream side's
    problem: 502, as a connection failure is."""

    async def broken(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    client = ImageFetcher(FetchPolicy(max_bytes=1 << 20), resolver=broken)
    try:
        with pytest.raises(
            FetchError, match=r"cannot resolve 'images\.example': .*Temporary"
        ) as failed:
            await client.fetch("http://images.example/cat.png")
    finally:
        await client.aclose()
    assert not isinstance(failed.value, FetchRefused)
    assert failed.value.http_status == 502


async def test_refusals_are_worded_for_image_urls() -> None:
    with pytest.raises(FetchRefused) as refused:
        await fetch("http://10.1.2.3/cat.png", allow_hosts=frozenset())
    assert refused.value.detail == "refusing to fetch from 10.1.2.3: a private address"
    with pytest.raises(FetchRefused, match=r"^URL 'http:.*cat\.png' has no host$"):
        await fetch("http:///cat.png")


# --- redirects ------------------------------------------------------------------------


async def test_up_to_three_redirects_are_followed(server: Server) -> None:
    assert await fetch(server.url("/hops/2")) == PNG  # 3 redirects: 2, 1, 0 -> image
    assert server.upstream.paths == ["/hops/2", "/hops/1", "/hops/0", "/cat.png"]


async def test_a_fourth_redirect_is_refused(server: Server) -> None:
    with pytest.raises(FetchRefused, match="more than 3 times"):
        await fetch(server.url("/hops/3"))
    assert "/cat.png" not in server.upstream.paths
    with pytest.raises(FetchRefused, match="more than 0 times"):
        await fetch(server.url("/hops/0"), max_redirects=0)


async def test_every_redirect_is_vetted(server: Server) -> None:
    # The first hop is allowed (127.0.0.1 is on the allow-list); "localhost" is not, and
    # resolves to loopback: refused before anything is sent there.
    target = server.url("/cat.png", host="localhost")
    with pytest.raises(FetchRefused, match=r"localhost .*loopback"):
        await fetch(server.url(f"/redirect?to={target}"))
    for location in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"):
        with pytest.raises(FetchRefused, match=r"metadata|private"):
            await fetch(server.url(f"/redirect?to={location}"))
    with pytest.raises(FetchRefused, match="only http and https"):
        await fetch(server.url("/redirect?to=file:///etc/passwd"))
    assert server.upstream.paths.count("/cat.png") == 0


# --- upstream answers, size and time limits --------------------------------------------


async def test_upstream_error_status_is_a_bad_gateway(server: Server) -> None:
    with pytest.raises(FetchError, match="404") as failed:
        await fetch(server.url("/missing"))
    assert failed.value.http_status == 502


async def test_connection_refused_is_a_bad_gateway() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(FetchError, match="cannot connect") as failed:
            await fetch(f"http://127.0.0.1:{port}/cat.png")
    assert failed.value.http_status == 502


async def test_non_image_bytes_are_returned_for_validation(server: Server) -> None:
    # Content decides what an image is (ingest.validation), not the Content-Type header.
    assert await fetch(server.url("/page")) == b"<html>not an image</html>"


async def test_declared_length_over_the_cap_is_refused_before_reading(server: Server) -> None:
    with pytest.raises(ImageTooLarge, match="1000000000 bytes") as too_large:
        await fetch(server.url("/declared-huge"), max_bytes=1000)
    assert too_large.value.http_status == 413


async def test_undeclared_length_is_capped_while_streaming(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="exceeds the limit of 100000 bytes"):
        await fetch(server.url("/endless"), max_bytes=100_000)
    assert time.monotonic() - started < 10
    assert server.upstream.aborted.wait(10), "the server saw the connection closed"
    assert server.upstream.bytes_sent < 32 * 1024 * 1024, "the body was not read to its end"


async def test_read_timeout_is_a_gateway_timeout(server: Server) -> None:
    with pytest.raises(FetchTimeout) as timed_out:
        await fetch(server.url("/slow-headers"), read_timeout_s=0.3)
    assert timed_out.value.http_status == 504


async def test_total_timeout_bounds_a_dribbling_upstream(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(FetchTimeout, match=r"longer than 0\.5s"):
        await fetch(server.url("/dribble"), read_timeout_s=5, total_timeout_s=0.5)
    assert time.monotonic() - started < 3


# --- the connection goes to the vetted address -----------------------------------------


async def test_connects_to_the_vetted_address_without_resolving_again(server: Server) -> None:
    """DNS rebinding: the first answer is vetted; a later, different answer must never be
    used. The name does not exist for the system resolver either, so a second lookup by
    the HTTP client would fail the fetch."""
    answers: list[list[IPAddress]] = [
        [ipaddress.ip_address("127.0.0.1")],
        [ipaddress.ip_address("10.0.0.1")],
    ]
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[IPAddress]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    client = ImageFetcher(
        FetchPolicy(max_bytes=1 << 20, allow_networks=(ipaddress.ip_network("127.0.0.0/8"),)),
        resolver=rebinding,
    )
    try:
        data = await client.fetch(f"http://rebind.invalid:{server.port}/cat.png")
    finally:
        await client.aclose()
    assert data == PNG
    assert calls == ["rebind.invalid"], "resolved once"
    assert server.upstream.host_headers == [f"rebind.invalid:{server.port}"], "real Host header"


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name `name` (openssl CLI)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_https_to_the_vetted_address_sends_sni_and_verifies_the_name(
    tmp_path: Path,
) -> None:
    cert, key = make_cert(tmp_path, "images.test")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    tls.sni_callback = lambda _sock, name, _ctx: seen_sni.append(name)  # type: ignore[assignment,func-returns-value]
    trust = ssl.create_default_context(cafile=str(cert))

    async def local(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("127.0.0.1")]

    policy = FetchPolicy(max_bytes=1 << 20, allow_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    for server in serve(tls):
        client = ImageFetcher(policy, resolver=local, verify=trust)
        try:
            assert await client.fetch(server.url("/cat.png", host="images.test")) == PNG
            # The certificate is checked against the name, not the IP connected to.
            with pytest.raises(FetchError, match="cannot connect") as failed:
                await client.fetch(server.url("/cat.png", host="other.test"))
            assert failed.value.http_status == 502
        finally:
            await client.aclose()
        assert server.upstream.host_headers == [f"images.test:{server.port}"]
    assert seen_sni[:2] == ["images.test", "other.test"]
