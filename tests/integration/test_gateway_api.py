"""The gateway's operational and submission API on real processes and the embedded broker:
readiness, metrics, jobs by URL, and upload limits enforced while streaming."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from aiokafka import AIOKafkaProducer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from captionstream.broker import EmbeddedBroker, free_port
from captionstream.schemas.events import GenerationOptions, JobState, decode_image_submitted, utcnow
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_noise_png, make_png
from tests.integration.stack import (
    Component,
    Gateway,
    Stack,
    read_topic,
    serving,
    wait_until,
)

SMALL_LIMIT = 100_000  # CAPTIONSTREAM_MAX_UPLOAD_BYTES of the `limited` gateway


def readyz(gateway: Gateway, timeout_s: float = 10) -> httpx.Response:
    return httpx.get(f"{gateway.url}/readyz", timeout=timeout_s)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return stack.start_gateway()


# --- readiness ------------------------------------------------------------------------


def test_readyz_is_ready_on_a_healthy_stack(gateway: Gateway) -> None:
    response = readyz(gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["broker"].startswith("ok")
    assert body["checks"]["job_view"].startswith("ok")
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).json() == {"status": "ok"}


def test_readyz_follows_the_broker(stack: Stack, tmp_path: Path) -> None:
    """A frozen broker (accepts TCP, never answers) and a dead one both make the gateway
    unready, naming the broker, within the probe timeout; liveness is unaffected."""
    broker = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    try:
        gateway = stack.start_gateway(
            CAPTIONSTREAM_KAFKA_BOOTSTRAP=broker.bootstrap,
            CAPTIONSTREAM_READINESS_TIMEOUT_S="1",
        )
        wait_until(lambda: readyz(gateway).status_code == 200, 30, "the gateway to be ready")

        assert broker.pid is not None  # the test's own broker process
        pid = broker.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = readyz(gateway)
            elapsed = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert response.status_code == 503, response.text
        assert elapsed < 5, "the probe is bounded by CAPTIONSTREAM_READINESS_TIMEOUT_S"
        body = response.json()
        assert body["detail"].startswith("not ready: broker:"), body
        assert "within 1s" in body["checks"]["broker"]
        assert body["checks"]["job_view"].startswith("ok"), "only the failing check is named"

        wait_until(lambda: readyz(gateway).status_code == 200, 30, "readiness to come back")

        broker.stop()
        response = readyz(gateway)
        assert response.status_code == 503, response.text
        assert "broker" in response.json()["detail"]
        assert gateway.healthy(), "liveness does not depend on Kafka"
        assert gateway.component is not None
        gateway.component.stop()
    finally:
        broker.stop()


# --- metrics --------------------------------------------------------------------------


def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_a_job_from_upload_to_success(gateway: Gateway, worker: Component) -> None:
    before = scrape(gateway)
    response = gateway.upload(make_png(40, 30, color=(10, 200, 10)))
    assert response.status_code == 202, response.text
    assert gateway.wait_terminal(response.json()["job_id"])["status"] == "SUCCESS"

    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("captionstream_gateway_jobs_submitted_total", source="upload") == 1
    assert delta("captionstream_job_end_to_end_seconds_count", status="SUCCESS") == 1
    assert delta("captionstream_gateway_view_jobs", status="SUCCESS") == 1
    assert (
        delta(
            "captionstream_gateway_http_requests_total",
            route="/api/v1/upload",
            method="POST",
            status="202",
        )
        == 1
    )
    assert (
        delta(
            "captionstream_gateway_http_requests_total",
            route="/api/v1/status/{job_id}",
            method="GET",
            status="200",
        )
        >= 1
    )
    assert sample(after, "process_resident_memory_bytes") > 0


async def test_metrics_count_open_websockets(stack: Stack, gateway: Gateway) -> None:
    """A job that stays PENDING (no image event) keeps its WebSocket open."""
    job_id = "ws-metrics-" + utcnow().strftime("%H%M%S%f")
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        state = JobState.pending(job_id, utcnow())
        await producer.send_and_wait(
            TOPICS.job_state.name, state.model_dump_json().encode(), key=job_id.encode()
        )
    finally:
        await producer.stop()
    wait_until(lambda: gateway.status(job_id).status_code == 200, 30, "the view to see the job")

    name = "captionstream_gateway_websocket_connections"
    assert sample(scrape(gateway), name) == 0
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/{job_id}") as ws:
        assert "PENDING" in str(await ws.recv())
        assert sample(scrape(gateway), name) == 1
    wait_until(lambda: sample(scrape(gateway), name) == 0, 10, "the gauge to drop on close")


# --- status: one waiting request instead of polling --------------------------------


def test_one_status_request_with_wait_gets_the_caption(gateway: Gateway, worker: Component) -> None:
    """Upload, then a single `?wait=30`: held on the gateway's view until the worker's
    SUCCESS arrives through Kafka, answered with the caption, no Retry-After."""
    response = gateway.upload(make_noise_png(32, 24))  # random: never a cache hit
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "PENDING"
    job_id = response.json()["job_id"]
    started = time.monotonic()
    status = httpx.get(f"{gateway.url}/api/v1/status/{job_id}", params={"wait": 30}, timeout=40)
    elapsed = time.monotonic() - started
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["status"] == "SUCCESS", body
    assert isinstance(body["result"]["caption"], str)
    assert "retry-after" not in status.headers
    assert elapsed < 29, f"answered when the job finished ({elapsed:.1f} s), not at the bound"


# --- jobs by URL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving a directory of files; yields its base URL."""
    root = tmp_path_factory.mktemp("www")
    (root / "cat.png").write_bytes(make_png(48, 32, color=(250, 200, 0)))
    (root / "page.html").write_bytes(b"<html>not an image</html>")
    (root / "big.png").write_bytes(make_noise_png(256, 256))  # > SMALL_LIMIT
    assert (root / "big.png").stat().st_size > SMALL_LIMIT
    with serving(root) as base:
        yield base


@pytest.fixture(scope="module")
def limited(stack: Stack) -> Gateway:
    """A gateway that may fetch from 127.0.0.1 and accepts at most SMALL_LIMIT bytes."""
    return stack.start_gateway(
        CAPTIONSTREAM_FETCH_ALLOW_HOSTS="127.0.0.1",
        CAPTIONSTREAM_MAX_UPLOAD_BYTES=str(SMALL_LIMIT),
    )


def submit_url(gateway: Gateway, url: str, **options: object) -> httpx.Response:
    body: dict[str, object] = {"image_url": url}
    if options:
        body["options"] = options
    return httpx.post(f"{gateway.url}/api/v1/jobs", json=body, timeout=30)


async def submitted_event_options(bootstrap: str, job_id: str) -> GenerationOptions:
    records = await read_topic(bootstrap, TOPICS.images.name)
    [event] = [decode_image_submitted(v) for k, v in records if k == job_id.encode()]
    return event.options


async def test_submit_by_url_runs_the_job_with_its_options(
    stack: Stack, worker: Component, limited: Gateway, images: str
) -> None:
    before = scrape(limited)
    response = submit_url(
        limited, f"{images}/cat.png", max_new_tokens=5, num_beams=2, prompt="a picture of"
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["job_id"]
    assert accepted["status"] == "PENDING"
    assert response.headers["location"] == f"/api/v1/status/{job_id}"

    done = limited.wait_terminal(job_id)
    assert done["status"] == "SUCCESS", done
    assert isinstance(done["result"], dict)
    assert isinstance(done["result"]["caption"], str)
    assert await submitted_event_options(stack.bootstrap, job_id) == GenerationOptions(
        max_new_tokens=5, num_beams=2, prompt="a picture of"
    )
    after = scrape(limited)
    name = "captionstream_gateway_jobs_submitted_total"
    assert sample(after, name, source="url") - sample(before, name, source="url") == 1


async def test_upload_accepts_options_as_form_fields(stack: Stack, limited: Gateway) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as client:
        response = await client.post(
            "/api/v1/upload",
            files={"file": ("cat.png", make_png(20, 20))},
            data={"num_beams": "3", "prompt": "a drawing of"},
        )
        assert response.status_code == 202, response.text
        bad = await client.post(
            "/api/v1/upload",
            files={"file": ("cat.png", make_png(20, 20))},
            data={"num_beams": "99"},
        )
    options = await submitted_event_options(stack.bootstrap, response.json()["job_id"])
    assert options == GenerationOptions(num_beams=3, prompt="a drawing of")
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"][0]["loc"] == ["body", "num_beams"]


def test_ssrf_loopback_and_metadata_are_refused(gateway: Gateway, images: str) -> None:
    """The default gateway has no allow-list: the same local server is out of bounds."""
    for url, needle in [
        (f"{images}/cat.png", "loopback"),
        (images.replace("127.0.0.1", "localhost") + "/cat.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::ffff:10.0.0.1]/x.png", "private"),
        ("http://10.0.0.1/x.png", "private"),
    ]:
        response = submit_url(gateway, url)
        assert response.status_code == 400, (url, response.text)
        assert needle in response.json()["detail"], response.json()


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"image_url": "file:///etc/passwd"}, 400, "only http and https"),
        ({"image_url": "ftp://127.0.0.1/cat.png"}, 400, "only http and https"),
        ({"image_url": "http://user:pw@127.0.0.1/cat.png"}, 400, "credentials"),
        ({"image_url": "http://no-such-host.invalid/cat.png"}, 400, "unknown host"),
        ({"image_url": "{images}/page.html"}, 415, "not a supported image"),
        ({"image_url": "{images}/big.png"}, 413, f"limit is {SMALL_LIMIT} bytes"),
        ({"image_url": "{images}/missing.png"}, 502, "404"),
        ({"image_url": "{images}/cat.png", "options": {"num_beams": 99}}, 422, "num_beams"),
        ({"image_url": "{images}/cat.png", "options": {"temperature": 2}}, 422, "temperature"),
        ({"image_url": "{images}/cat.png", "callback": "x"}, 422, "callback"),
        ({"url": "{images}/cat.png"}, 422, "image_url"),
    ],
    ids=[
        "file-scheme",
        "ftp-scheme",
        "credentials",
        "unknown-host",
        "not-an-image",
        "too-big",
        "upstream-404",
        "bad-option",
        "unknown-option",
        "unknown-field",
        "missing-url",
    ],
)
def test_bad_url_submissions(
    limited: Gateway, images: str, body: dict[str, object], code: int, needle: str
) -> None:
    if isinstance(body.get("image_url"), str):
        body = {**body, "image_url": str(body["image_url"]).format(images=images)}
    if isinstance(body.get("url"), str):
        body = {**body, "url": str(body["url"]).format(images=images)}
    response = httpx.post(f"{limited.url}/api/v1/jobs", json=body, timeout=30)
    assert response.status_code == code, response.text
    assert needle in str(response.json()["detail"])


# --- the content decides, not the file name ------------------------------------------


def upload_as(gateway: Gateway, data: bytes, filename: str) -> httpx.Response:
    """A multipart upload whose part says exactly `filename="..."` (httpx would leave an
    empty name out)."""
    boundary = "captionstream-name"
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return httpx.post(
        f"{gateway.url}/api/v1/upload",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )


def make_jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (width, height, 90)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("filename", "size"),
    [("blob", (21, 13)), ("photo", (22, 13)), ("image.txt", (23, 13)), ("", (24, 13))],
    ids=["blob", "photo", "image.txt", "no-name"],
)
def test_a_jpeg_is_accepted_whatever_its_file_name(
    gateway: Gateway, filename: str, size: tuple[int, int]
) -> None:
    """A browser's `FormData.append("file", blob)` names the file `blob`."""
    response = upload_as(gateway, make_jpeg(*size), filename)
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("PENDING", "SUCCESS")  # SUCCESS: a cache hit


def test_a_text_file_named_like_a_jpeg_is_415(gateway: Gateway) -> None:
    response = upload_as(gateway, b"these are my notes, not a cat\n" * 20, "cat.jpg")
    assert response.status_code == 415, response.text
    assert response.json() == {
        "detail": "content is not a supported image (JPEG, PNG, GIF, BMP, TIFF, ICO, WebP)"
    }


# --- upload size limit, enforced while the body streams --------------------------------

TWENTY_MIB = 20 * 1024 * 1024


def raw_post(
    gateway: Gateway, head: list[str], body: list[bytes], timeout_s: float = 10
) -> tuple[bytes, int]:
    """POST over a plain socket like a client that watches for an early answer: send
    `head`, then `body` piece by piece, stopping as soon as the server answers; read
    until it closes (the 413 closes the connection). Returns (answer, pieces sent)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    request_head = "\r\n".join(["POST /api/v1/upload HTTP/1.1", f"Host: {host}", *head])
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(f"{request_head}\r\n\r\n".encode())
        sent = 0
        for piece in body:
            if select.select([sock], [], [], 0.2)[0]:
                break  # the server answered early
            sock.sendall(piece)
            sent += 1
        answer = b""
        while part := sock.recv(65536):
            answer += part
        return answer, sent


def test_oversized_upload_is_refused_with_413(limited: Gateway) -> None:
    response = limited.upload(os.urandom(TWENTY_MIB), "huge.png")
    assert response.status_code == 413, response.text
    assert "limit is" in response.json()["detail"]
    assert limited.healthy()


def test_declared_oversized_body_is_refused_before_it_is_sent(limited: Gateway) -> None:
    """Content-Length says 20 MiB: the answer comes without a single body byte sent."""
    started = time.monotonic()
    answer, _ = raw_post(
        limited,
        [f"Content-Length: {TWENTY_MIB}", "Content-Type: multipart/form-data; boundary=xyz"],
        [],
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b'"detail"' in answer
    assert f"the limit is {SMALL_LIMIT + 64 * 1024} bytes".encode() in answer
    assert time.monotonic() - started < 5


def test_chunked_oversized_body_is_refused_while_streaming(limited: Gateway) -> None:
    """No Content-Length: the body is counted as it arrives and refused once past the
    limit, although it never ends (no final chunk is ever sent)."""
    boundary = "xyz"
    part_head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunk = b"\0" * 65536
    pieces = [b"%x\r\n%s\r\n" % (len(part_head), part_head)]
    pieces += [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 320  # 20 MiB, and no final chunk
    answer, sent = raw_post(
        limited,
        ["Transfer-Encoding: chunked", f"Content-Type: multipart/form-data; boundary={boundary}"],
        pieces,
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"request body passed" in answer
    assert sent < 10, f"answered after {sent} of {len(pieces)} pieces, not at the end"
    assert limited.healthy()
