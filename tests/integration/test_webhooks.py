"""Webhooks on real processes: a gateway with a webhook secret delivers signed POSTs for
finished jobs to a receiver on 127.0.0.1 (allow-listed, as a private deployment would),
retries 5xx, gives up on 410; a gateway without the allow-list refuses non-public URLs
at submission."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from captionstream.schemas.events import ImageSubmitted, JobState, caption_event_id, utcnow
from captionstream.schemas.topics import TOPICS
from captionstream.schemas.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack, wait_until

pytestmark = pytest.mark.brokers("embedded", "apache")

SECRET = "integration-webhook-secret"
# A group of this module's own: no other test's gateway takes a share of the partitions.
GROUP = f"webhooks-test-{uuid.uuid4().hex[:8]}"


class Receiver:
    """Per path: the scripted statuses (the last one repeats); records every request."""

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        self.requests: defaultdict[str, list[tuple[dict[str, str], bytes, float]]] = defaultdict(
            list
        )
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen = receiver.requests[self.path]
                seen.append((dict(self.headers), body, time.monotonic()))
                statuses = receiver.script.get(self.path, [200])
                self.send_response(statuses[min(len(seen), len(statuses)) - 1])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, *statuses: int) -> str:
        self.script[path] = list(statuses) or [200]
        return self.base + path

    def wait_for(
        self, path: str, count: int, timeout_s: float = 60
    ) -> list[tuple[dict[str, str], bytes, float]]:
        wait_until(
            lambda: len(self.requests[path]) >= count, timeout_s, f"{count} POST(s) to {path}"
        )
        return self.requests[path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture(scope="module")
def hooked(stack: Stack, worker: Component) -> Gateway:
    return stack.start_gateway(
        CAPTIONSTREAM_WEBHOOK_SECRET=SECRET,
        CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        CAPTIONSTREAM_WEBHOOK_BACKOFF_S="0.2",
        CAPTIONSTREAM_WEBHOOK_MAX_ATTEMPTS="4",
        CAPTIONSTREAM_WEBHOOK_GROUP_ID=GROUP,
    )


def upload(gateway: Gateway, color: tuple[int, int, int], webhook_url: str) -> str:
    response = httpx.post(
        f"{gateway.url}/api/v1/upload",
        files={"file": ("hook.png", make_png(20, 20, color))},
        data={"webhook_url": webhook_url},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def check_signed(headers: dict[str, str], body: bytes) -> dict[str, object]:
    assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body, tolerance_s=60)
    assert not verify_signature("another secret", headers[SIGNATURE_HEADER], body)
    payload: dict[str, object] = json.loads(body)
    assert headers[EVENT_ID_HEADER] == payload["event_id"]
    submitted_at = datetime.fromisoformat(str(payload["submitted_at"]))
    assert payload["event_id"] == caption_event_id(str(payload["job_id"]), submitted_at)
    return payload


def test_a_success_is_posted_signed(hooked: Gateway, receiver: Receiver) -> None:
    job_id = upload(hooked, (1, 120, 7), receiver.url("/ok"))
    [(headers, body, _)] = receiver.wait_for("/ok", 1)
    payload = check_signed(headers, body)
    status = hooked.wait_terminal(job_id)
    assert payload["type"] == "job.finished"
    assert payload["job_id"] == job_id
    assert payload["status"] == "SUCCESS"
    assert payload["caption"] == status["result"]["caption"]  # type: ignore[index]
    assert payload["error"] is None
    assert payload["submitted_at"]
    assert payload["finished_at"]


async def test_a_failure_is_posted_signed(
    hooked: Gateway, receiver: Receiver, stack: Stack
) -> None:
    """An image event whose image is gone (published straight to Kafka) ends FAILURE."""
    ghost = ImageSubmitted(
        job_id="hook-ghost-" + uuid.uuid4().hex[:8],
        image_ref=(stack.data_dir / "blobs" / "00" / ("0" * 64 + ".png")).as_uri(),
        content_type="image/png",
        size_bytes=1,
        width=1,
        height=1,
        sha256="0" * 64,
        submitted_at=utcnow(),
        webhook_url=receiver.url("/failed"),
    )
    producer = stack.kafka.producer()
    await producer.start()
    try:
        key = ghost.job_id.encode()
        pending = JobState.submitted(ghost).model_dump_json().encode()
        await producer.send_and_wait(TOPICS.job_state.name, pending, key=key)
        await producer.send_and_wait(TOPICS.images.name, ghost.model_dump_json().encode(), key=key)
    finally:
        await producer.stop()
    [(headers, body, _)] = receiver.wait_for("/failed", 1)
    payload = check_signed(headers, body)
    assert payload["job_id"] == ghost.job_id
    assert payload["status"] == "FAILURE"
    assert "not in the blob store" in str(payload["error"])
    assert payload["caption"] is None


def test_two_500s_then_200_is_delivered_on_the_third_attempt(
    hooked: Gateway, receiver: Receiver
) -> None:
    job_id = upload(hooked, (2, 121, 8), receiver.url("/flaky", 500, 500, 200))
    attempts = receiver.wait_for("/flaky", 3)
    time.sleep(1.5)  # nothing after the success
    assert len(attempts) == 3
    payloads = [check_signed(headers, body) for headers, body, _ in attempts]
    assert {p["job_id"] for p in payloads} == {job_id}
    assert len({body for _, body, _ in attempts}) == 1, "the same body every time"
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.09 for gap in gaps), f"backed off between attempts: {gaps}"


def test_a_410_is_given_up_after_one_attempt(hooked: Gateway, receiver: Receiver) -> None:
    upload(hooked, (3, 122, 9), receiver.url("/gone", 410))
    receiver.wait_for("/gone", 1)
    time.sleep(2.0)  # backoff 0.2 s: a retry would have come by now
    assert len(receiver.requests["/gone"]) == 1
    wait_until(lambda: delivered(hooked, "rejected") >= 1, 10, "the rejected count")
    assert metric(hooked, "captionstream_gateway_webhook_attempts_total", result="4xx") >= 1


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def delivered(gateway: Gateway, outcome: str = "delivered") -> float:
    return metric(gateway, "captionstream_gateway_webhook_deliveries_total", outcome=outcome)


def test_replicas_share_the_deliveries_and_send_each_webhook_once(
    stack: Stack, hooked: Gateway, receiver: Receiver
) -> None:
    """A second gateway joins `hooked`'s webhook group: they split the job-state
    partitions, each finished job's webhook comes from one of them, and both do part of
    the work. (Every gateway with webhooks on and another group would send them too.)"""
    replicas = [
        hooked,
        stack.start_gateway(
            CAPTIONSTREAM_WEBHOOK_SECRET=SECRET,
            CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
            CAPTIONSTREAM_WEBHOOK_GROUP_ID=GROUP,
        ),
    ]
    # Warm up until both replicas have delivered since the second joined: the group has
    # settled with partitions on each (4 partitions), so no rebalance moves work below.
    baseline = [delivered(g) for g in replicas]
    colors = itertools.count(1)
    for _ in range(40):
        if all(delivered(g) > b for g, b in zip(replicas, baseline, strict=True)):
            break
        warm = f"/warm-{next(colors)}"
        upload(replicas[1], (200, next(colors) % 256, 50), receiver.url(warm))
        receiver.wait_for(warm, 1)
    assert all(delivered(g) > b for g, b in zip(replicas, baseline, strict=True)), (
        "both replicas own partitions"
    )
    before = [delivered(g) for g in replicas]

    paths = [f"/replica-{uuid.uuid4().hex[:6]}" for _ in range(12)]
    for i, path in enumerate(paths):
        upload(replicas[i % 2], (90, i * 20 % 256, next(colors) % 256), receiver.url(path))
    for path in paths:
        receiver.wait_for(path, 1)
    time.sleep(2.0)  # a duplicate from the other replica would have come by now
    assert {path: len(receiver.requests[path]) for path in paths} == dict.fromkeys(paths, 1)
    after = [delivered(g) for g in replicas]
    assert sum(after) - sum(before) == len(paths), "each webhook delivered by one replica"


# --- submission-time refusals -------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(stack: Stack) -> Gateway:
    """Webhooks on, no allow-list: only public receivers."""
    return stack.start_gateway(
        CAPTIONSTREAM_WEBHOOK_SECRET=SECRET,
        CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS="",
        CAPTIONSTREAM_WEBHOOK_ALLOW_NETWORKS="",
        CAPTIONSTREAM_WEBHOOK_GROUP_ID=f"webhooks-guarded-{uuid.uuid4().hex[:8]}",
    )


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://127.0.0.1/", "loopback"),
        ("http://10.1.2.3:8080/hook", "private"),
        ("ftp://hooks.example.com/", "http or https"),
    ],
)
def test_non_public_webhook_urls_are_refused_at_submission(
    guarded: Gateway, url: str, needle: str
) -> None:
    by_url = httpx.post(
        f"{guarded.url}/api/v1/jobs",
        json={"image_url": "https://example.com/cat.jpg", "webhook_url": url},
        timeout=30,
    )
    assert by_url.status_code == 400, by_url.text
    assert needle in by_url.json()["detail"]
    by_upload = httpx.post(
        f"{guarded.url}/api/v1/upload",
        files={"file": ("x.png", make_png(5, 5))},
        data={"webhook_url": url},
        timeout=30,
    )
    assert by_upload.status_code == 400, by_upload.text
    assert needle in by_upload.json()["detail"]


def test_metadata_is_refused_even_with_the_allow_list(hooked: Gateway) -> None:
    response = httpx.post(
        f"{hooked.url}/api/v1/upload",
        files={"file": ("x.png", make_png(5, 6))},
        data={"webhook_url": "http://169.254.169.254/"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert "metadata" in response.json()["detail"]


def test_an_overlong_webhook_url_is_a_422(guarded: Gateway) -> None:
    response = httpx.post(
        f"{guarded.url}/api/v1/jobs",
        json={"image_url": "https://example.com/a.jpg", "webhook_url": "https://h/" + "a" * 2100},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "webhook_url"]
