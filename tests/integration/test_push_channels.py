"""Push channels beyond the one-job WebSocket: one socket following many jobs, and
Server-Sent Events for clients without WebSockets."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from tests.helpers.images import make_png
from tests.helpers.jobs import TERMINAL
from tests.integration.stack import Component, Gateway, Stack

pytestmark = pytest.mark.brokers("embedded", "apache")


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return stack.start_gateway()


async def test_one_socket_follows_many_jobs(gateway: Gateway, worker: Component) -> None:
    job_ids = [gateway.upload(make_png(color=(i, 40, 80))).json()["job_id"] for i in range(3)]
    finals: dict[str, str] = {}
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws") as ws:
        await ws.send(json.dumps({"follow": job_ids[:2]}))
        await ws.send(json.dumps({"follow": [job_ids[2], "no-such-job"]}))
        not_found = None
        while len(finals) < 3 or not_found is None:
            message = json.loads(await ws.recv())
            if "detail" in message:
                not_found = message
            elif message["status"] in TERMINAL:
                finals[message["job_id"]] = message["status"]
    assert finals == dict.fromkeys(job_ids, "SUCCESS")
    assert not_found == {"job_id": "no-such-job", "detail": "job 'no-such-job' not found"}


def test_server_sent_events_stream_a_job_to_its_end(gateway: Gateway, worker: Component) -> None:
    job_id = gateway.upload(make_png(color=(7, 70, 170))).json()["job_id"]
    events = []
    with httpx.stream("GET", f"{gateway.url}/api/v1/jobs/{job_id}/events", timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():  # the server ends the stream after the terminal state
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "SUCCESS"
    assert all(e["job_id"] == job_id for e in events)
    assert events[-1]["result"]["caption"]


def test_server_sent_events_for_unknown_job_is_404(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.url}/api/v1/jobs/nope/events", timeout=10)
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]
