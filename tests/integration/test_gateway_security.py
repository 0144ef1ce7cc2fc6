"""API keys, the submission rate limit and CORS on a real gateway process, and JSON logs
from a real gateway and worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from captionstream.broker import EmbeddedBroker, free_port
from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack, wait_until

ORIGIN = "https://app.example"
PER_MINUTE = 6  # one token per 10 s
BURST = 2


@pytest.fixture(scope="module")
def secured(stack: Stack) -> Gateway:
    return stack.start_gateway(
        CAPTIONSTREAM_API_KEYS="k1,k2",
        CAPTIONSTREAM_RATE_LIMIT_PER_MINUTE=str(PER_MINUTE),
        CAPTIONSTREAM_RATE_LIMIT_BURST=str(BURST),
        CAPTIONSTREAM_CORS_ORIGINS=ORIGIN,
    )


def fresh_png() -> bytes:
    """An image no other test submitted (so no caption-cache hit)."""
    r, g, b = os.urandom(3)
    return make_png(31, 17, color=(r, g, b))


def upload(gateway: Gateway, key: str | None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["X-API-Key"] = key
    return httpx.post(
        f"{gateway.url}/api/v1/upload",
        files={"file": ("x.png", fresh_png())},
        headers=headers,
        timeout=30,
    )


def test_the_api_needs_a_key_and_operations_stay_open(secured: Gateway) -> None:
    missing = upload(secured, None)
    assert missing.status_code == 401, missing.text
    assert "no API key" in missing.json()["detail"]
    unknown = httpx.get(f"{secured.url}/api/v1/status/x", headers={"X-API-Key": "k3"}, timeout=10)
    assert unknown.status_code == 401
    assert "unknown API key" in unknown.json()["detail"]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        response = httpx.get(f"{secured.url}{path}", timeout=10)
        assert response.status_code in (200, 503), (path, response.status_code)
    scheme = httpx.get(f"{secured.url}/openapi.json", timeout=10).json()
    assert scheme["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


async def test_a_job_submitted_with_a_key_is_followed_over_websockets(
    secured: Gateway, worker: Component
) -> None:
    accepted = upload(secured, "k1")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]

    async with websockets.connect(f"{secured.ws_url}/api/v1/ws/{job_id}?api_key=k1") as ws:
        statuses = [json.loads(message)["status"] async for message in ws]
    assert statuses[-1] == "SUCCESS", statuses

    async with websockets.connect(
        f"{secured.ws_url}/api/v1/ws/{job_id}", additional_headers={"X-API-Key": "k2"}
    ) as ws:
        assert json.loads(await ws.recv())["status"] == "SUCCESS"

    for url in (f"/api/v1/ws/{job_id}", f"/api/v1/ws/{job_id}?api_key=wrong", "/api/v1/ws"):
        async with websockets.connect(f"{secured.ws_url}{url}") as ws:
            assert "API key" in json.loads(await ws.recv())["detail"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4401, url

    assert secured.component is not None
    log = secured.component.log()
    assert "api_key=k1" not in log, "a key in a query string never reaches the log"
    assert "api_key=***" in log


def test_submissions_past_the_burst_get_429_with_retry_after(secured: Gateway) -> None:
    assert [upload(secured, "k2").status_code for _ in range(BURST)] == [202] * BURST
    refused = upload(secured, "k2")
    assert refused.status_code == 429, refused.text
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60 / PER_MINUTE
    assert "per API key" in refused.json()["detail"]

    by_url = httpx.post(
        f"{secured.url}/api/v1/jobs",
        json={"image_url": "http://images.invalid/cat.png"},
        headers={"X-API-Key": "k2"},
        timeout=10,
    )
    assert by_url.status_code == 429, "both ways of submitting share the key's bucket"
    reads = httpx.get(f"{secured.url}/api/v1/status/x", headers={"X-API-Key": "k2"}, timeout=10)
    assert reads.status_code == 404, "reading is not rate limited"
    assert upload(secured, "k1").status_code == 202, "another key has its own bucket"


def test_cors_preflight_answers_the_allowed_origin_only(secured: Gateway) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            f"{secured.url}/api/v1/upload",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
            timeout=10,
        )

    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    other = preflight("https://elsewhere.example")
    assert "access-control-allow-origin" not in other.headers

    # A browser may read the API's errors too: the 401 carries the CORS headers.
    refused = upload(secured, None, Origin=ORIGIN)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_a_gateway_refuses_wildcard_cors_with_credentials(stack: Stack) -> None:
    component = stack.spawn(
        "gateway",
        CAPTIONSTREAM_PORT=str(free_port()),
        CAPTIONSTREAM_CORS_ORIGINS="*",
        CAPTIONSTREAM_CORS_ALLOW_CREDENTIALS="true",
    )
    assert component.proc.wait(60) == 1
    log = component.log()
    assert "CAPTIONSTREAM_CORS_ORIGINS" in log
    assert "CAPTIONSTREAM_CORS_ALLOW_CREDENTIALS" in log


def json_lines(component: Component) -> list[dict[str, object]]:
    """Every line of the component's output, each parsed as one JSON object."""
    entries = []
    for number, line in enumerate(component.log().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{component.name} line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "message"} <= entry.keys(), entry
        entries.append(entry)
    return entries


def test_json_logs_from_gateway_and_worker_carry_the_job_id(tmp_path: Path) -> None:
    """On their own broker (a second worker would share the session's partitions), a
    worker and a gateway with CAPTIONSTREAM_LOG_FORMAT=json write nothing but JSON lines
    (Faust's and uvicorn's own included), and both name the job they handled."""
    (tmp_path / "logs").mkdir()
    broker = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    own = Stack(bootstrap=broker.bootstrap, data_dir=tmp_path / "data", log_dir=tmp_path / "logs")
    try:
        worker = own.start_worker(CAPTIONSTREAM_LOG_FORMAT="json")
        gateway = own.start_gateway(CAPTIONSTREAM_LOG_FORMAT="json")
        accepted = gateway.upload(fresh_png())
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
        wait_until(lambda: "captioned" in worker.log(), 10, "the worker to log the job")
    finally:
        own.stop_all()
        broker.stop()

    assert gateway.component is not None
    gateway_lines = json_lines(gateway.component)
    worker_lines = json_lines(worker)
    assert any(e.get("job_id") == job_id and "accepted" in str(e["message"]) for e in gateway_lines)
    assert any(e.get("job_id") == job_id and "captioned" in str(e["message"]) for e in worker_lines)
    assert any(str(e["logger"]).startswith("uvicorn") for e in gateway_lines)
    assert any(str(e["logger"]).startswith("faust") for e in worker_lines), "Faust's own lines"
