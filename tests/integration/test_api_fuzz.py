"""The gateway's API fuzzed from its own OpenAPI schema, against the real process.

schemathesis generates requests for every operation of `/openapi.json` (WebSocket routes
are not in the schema) and checks that none is answered with a 5xx; the gateway runs as
its own process on the session's embedded broker, with the session's worker. Then a few
hostile uploads through the same real server: file names that try to pick where the
bytes are stored, and images that must be refused with a clear 4xx.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import socket
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error

from captionstream.gateway.app import create_app
from captionstream.ingest.address_guard import refusal_reason
from captionstream.settings import GatewaySettings
from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack, wait_until

# Where fuzzed image URLs are pointed instead of their own host: TEST-NET-1, a
# documentation range the SSRF guard refuses, so no example ever leaves this machine.
UNROUTABLE = "192.0.2.1"


@pytest.fixture(scope="module")
def fuzzed_gateway(stack: Stack, worker: Component) -> Iterator[Gateway]:
    gateway = stack.start_gateway(
        # Nothing non-public may be fetched, whatever other tests allow.
        CAPTIONSTREAM_FETCH_ALLOW_HOSTS="",
        CAPTIONSTREAM_FETCH_ALLOW_NETWORKS="",
        CAPTIONSTREAM_API_KEYS="",
        CAPTIONSTREAM_RATE_LIMIT_PER_MINUTE="0",
        # Webhooks on, so fuzzed webhook URLs reach the SSRF guard; public receivers only
        # (and fuzzed hosts are swapped like image URLs), in a group of its own.
        CAPTIONSTREAM_WEBHOOK_SECRET="fuzz-secret",
        CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS="",
        CAPTIONSTREAM_WEBHOOK_ALLOW_NETWORKS="",
        CAPTIONSTREAM_WEBHOOK_GROUP_ID=f"webhooks-fuzz-{uuid.uuid4().hex[:8]}",
    )
    wait_until(
        lambda: httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200,
        60,
        "the fuzzed gateway to be ready",
    )
    yield gateway
    assert gateway.component is not None
    assert gateway.component.alive(), gateway.component.log()[-3000:]


@pytest.fixture(scope="module")
def api_schema(fuzzed_gateway: Gateway) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_gateway.url}/openapi.json")


def schema_operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the gateway's OpenAPI, read from the app
    itself at collection time (no server needed), so each gets its own test id."""
    spec = create_app(GatewaySettings()).openapi()
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    ]


# (method, path) -> why it answers a 5xx (a known bug, reported; marked xfail strict).
KNOWN_SERVER_ERRORS: dict[tuple[str, str], str] = {}


def resolved_without_dns(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the gateway's resolver finds for `host` without asking DNS: an IP
    literal, or a number the C library reads as IPv4 (2130706433, 0x7f.1, 127.1)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def kept_on_this_machine(image_url: object) -> object:
    """`image_url` (or a webhook URL) with any host the gateway would connect to, or
    would ask DNS about (a name, a public address), swapped for an unroutable one that
    the SSRF guard refuses. Everything else in the URL stays as generated, and non-public addresses
    stay too: they are what the guard must refuse."""
    if not isinstance(image_url, str):
        return image_url
    try:
        url = httpx.URL(image_url)
        host = url.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeDecodeError):
        return image_url  # the gateway refuses it just the same
    if not host or host.lower() == "localhost":
        return image_url
    address = resolved_without_dns(host)
    if address is not None and refusal_reason(address) is not None:
        return image_url
    try:
        return str(url.copy_with(host=UNROUTABLE))
    except (httpx.InvalidURL, ValueError):
        return f"http://{UNROUTABLE}/"


# URL-shaped strings, so the examples reach the SSRF guard (random text rarely is a URL).
HOSTS = st.sampled_from(
    [
        "localhost",
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "0",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "10.0.0.1",
        "192.168.1.1",
        "[fe80::1]",
        "224.0.0.1",
        "255.255.255.255",
        "8.8.8.8",
        "1.2.3",
        "example.com",
        "xn--caf-dma.example",
    ]
) | st.text(min_size=1, max_size=30)
IMAGE_URLS = st.builds(
    "{}://{}{}{}/{}".format,
    st.sampled_from(["http", "https", "HTTP", "ftp", "file", "gopher", "javascript", "data"]),
    st.sampled_from(["", "user:pass@", "user@", "@"]),
    HOSTS,
    st.sampled_from(["", ":80", ":0", ":65535", ":99999", ":-1", ":x"]),
    st.text(max_size=40),
)
URL_BODIES = st.fixed_dictionaries(
    {"image_url": IMAGE_URLS},
    optional={
        "webhook_url": IMAGE_URLS,
        "options": st.fixed_dictionaries(
            {},
            optional={
                "max_new_tokens": st.integers(-5, 300),
                "num_beams": st.integers(-1, 10),
                "prompt": st.text(max_size=220),
            },
        ),
    },
)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param(
            method,
            path,
            id=f"{method} {path}",
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_SERVER_ERRORS[method, path])]
            if (method, path) in KNOWN_SERVER_ERRORS
            else [],
        )
        for method, path in schema_operations()
    ],
)
def test_operation_never_answers_a_server_error(
    api_schema: BaseSchema, method: str, path: str
) -> None:
    """25 requests, schema-valid and schema-invalid (headers, path, query and body; URL
    submissions also get URL-shaped bodies): any answer but a 5xx. Shrinking is off:
    each example is a real request."""
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    if (method, path) == ("POST", "/api/v1/jobs"):
        cases |= URL_BODIES.map(
            lambda body: operation.Case(body=body, media_type="application/json")
        )

    @given(case=cases)
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: schemathesis.Case) -> None:
        if method == "POST" and isinstance(case.body, dict):
            for field in ("image_url", "webhook_url"):
                if field in case.body:
                    case.body = {**case.body, field: kept_on_this_machine(case.body[field])}
        case.call_and_validate(checks=[not_a_server_error], timeout=30)

    call()


# --- hostile uploads through the real server ----------------------------------------------


def gif_of_5000_frames() -> bytes:
    frames = [Image.new("RGB", (8, 8), (i % 256, i // 256 * 40, 0)) for i in range(5000)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def png_declaring_ten_gigapixels() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd.png",
        "..%2F..%2Fetc%2Fpasswd.png",
        "/etc/cron.d/evil.png",
        "a\0b.png",
        "../../etc/cron.d/evil",
    ],
    ids=["dot-dot", "encoded", "absolute", "nul", "no-extension"],
)
def test_multipart_file_name_cannot_pick_where_the_blob_is_stored(
    fuzzed_gateway: Gateway, stack: Stack, filename: str
) -> None:
    data = make_png(7, len(filename))  # distinct content for each name
    sha = hashlib.sha256(data).hexdigest()
    disposition = f'form-data; name="file"; filename="{filename}"'.encode()
    boundary = b"captionstream-fuzz"
    body = b"".join(
        [
            b"--" + boundary + b"\r\n",
            b"Content-Disposition: " + disposition + b"\r\n",
            b"Content-Type: image/png\r\n\r\n",
            data,
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )
    response = httpx.post(
        f"{fuzzed_gateway.url}/api/v1/upload",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"},
        timeout=30,
    )
    assert response.status_code in (202, 400, 415, 422), response.text
    blobs = stack.data_dir / "blobs"
    stored = blobs / sha[:2] / f"{sha}.png"
    if response.status_code == 202:
        assert stored.read_bytes() == data
    outside = [
        path
        for path in stack.data_dir.parent.rglob("*")
        if path.is_file() and path.name.endswith(".png") and not path.is_relative_to(blobs)
    ]
    assert outside == []
    assert not Path("/etc/passwd.png").exists()
    assert not Path("/etc/cron.d/evil.png").exists()
    assert not Path("/etc/cron.d/evil").exists()


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        (gif_of_5000_frames(), 413, "5000 frames"),
        (png_declaring_ten_gigapixels(), 413, "decompression bomb"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "not a supported image"),
    ],
    ids=["5000-frame-gif", "png-bomb", "svg"],
)
def test_hostile_images_get_a_clear_4xx_from_the_gateway(
    fuzzed_gateway: Gateway, data: bytes, code: int, needle: str
) -> None:
    response = fuzzed_gateway.upload(data, "hostile.gif")
    assert response.status_code == code, response.text
    assert needle in json.loads(response.text)["detail"]
