"""The gateway is SIGKILLed while jobs are in flight and WebSocket clients follow them;
a new gateway starts on the same port.

The new gateway rebuilds its view from the job-state topic before it serves, so clients
that reconnect get each job's current state first (also for jobs that finished while no
gateway was up), then every change. Every accepted job ends SUCCESS and every client
sees the terminal state of each job it follows.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import websockets

from captionstream.broker import free_port
from captionstream.schemas.events import decode_job_state
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.helpers.jobs import TERMINAL
from tests.integration.stack import Gateway, Stack, own_stack, read_topic

# On the embedded broker in `make soak` only: test_broker_restart rebuilds a gateway's view
# there after a restart, in `make test`; the push channels are broker-independent.
pytestmark = pytest.mark.brokers("embedded", "apache", soak_on=("embedded",))

JOBS = 60
ORDER = ["PENDING", "STARTED", "SUCCESS"]


@pytest.fixture
def slow_stack(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("gateway-restart"),
        broker_kind=broker_kind,
        # Paced (0.8 s a batch at least, 12 s for all), so jobs still run after the kill.
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
        CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.2",
        CAPTIONSTREAM_MAX_BATCH_SIZE="4",
    ) as stack:
        yield stack


@dataclass
class Client:
    """A WebSocket client that follows some jobs and reconnects whenever it loses the
    gateway, until it has seen every job's terminal state."""

    job_ids: list[str]
    one_socket: bool  # `/api/v1/ws` for all its jobs, else `/api/v1/ws/{job_id}` each
    # Per connection, per job: the statuses received on it, in order.
    connections: list[dict[str, list[str]]] = field(default_factory=list)
    terminal: dict[str, dict[str, object]] = field(default_factory=dict)

    def remaining(self) -> list[str]:
        return [j for j in self.job_ids if j not in self.terminal]

    def receive(self, received: dict[str, list[str]], message: dict[str, object]) -> None:
        assert "detail" not in message, f"an accepted job is unknown: {message}"
        job_id = str(message["job_id"])
        received.setdefault(job_id, []).append(str(message["status"]))
        if message["status"] in TERMINAL:
            self.terminal[job_id] = message

    async def run(self, ws_url: str) -> None:
        if self.one_socket:
            await self._retrying(self._follow_all, ws_url)
        else:
            await asyncio.gather(
                *(self._retrying(self._follow_one, ws_url, j) for j in self.job_ids)
            )

    async def _retrying(self, follow: Callable[..., Awaitable[None]], *args: str) -> None:
        job_id = args[1] if len(args) > 1 else None
        while self.remaining() if job_id is None else job_id not in self.terminal:
            try:
                await follow(*args)
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException):
                await asyncio.sleep(0.2)  # the gateway is gone: try again

    async def _follow_all(self, ws_url: str) -> None:
        async with websockets.connect(f"{ws_url}/api/v1/ws", open_timeout=5) as ws:
            received: dict[str, list[str]] = {}
            self.connections.append(received)
            await ws.send(json.dumps({"follow": self.remaining()}))
            async for raw in ws:
                self.receive(received, json.loads(raw))
                if not self.remaining():
                    return

    async def _follow_one(self, ws_url: str, job_id: str) -> None:
        async with websockets.connect(f"{ws_url}/api/v1/ws/{job_id}", open_timeout=5) as ws:
            received: dict[str, list[str]] = {}
            self.connections.append(received)
            async for raw in ws:  # the gateway closes the socket after the terminal state
                self.receive(received, json.loads(raw))


async def submit_all(gateway: Gateway, count: int) -> list[str]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

        async def one(i: int) -> str:
            image = make_png(16 + i % 50, 16 + i // 50, color=(i % 256, 31, 77))
            response = await client.post("/api/v1/upload", files={"file": (f"{i}.png", image)})
            assert response.status_code == 202, response.text
            return str(response.json()["job_id"])

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_gateway_sigkill_mid_stream_clients_reconnect_to_current_state(
    slow_stack: Stack,
) -> None:
    stack = slow_stack
    stack.start_worker()
    port = free_port()
    first = stack.start_gateway(port=port)
    job_ids = await submit_all(first, JOBS)

    clients = [
        Client(job_ids[:25], one_socket=True),
        Client(job_ids[25:50], one_socket=True),
        Client(job_ids[50:], one_socket=False),  # 10 single-job sockets
    ]
    followed = asyncio.gather(*(c.run(first.ws_url) for c in clients))

    # Kill the gateway once results flow, with most jobs still to do. The clients' own
    # pushes say when: polling 60 statuses over HTTP was slow enough, on a slow machine,
    # that most jobs had finished before the kill landed.
    deadline = time.monotonic() + 60
    while len({j for c in clients for j in c.terminal}) < 8:
        assert time.monotonic() < deadline, "no results pushed within 60 s"
        await asyncio.sleep(0.05)
    assert first.component is not None
    first.component.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(0.5)  # the clients read what reached them, then see the socket gone
    done_at_kill = {j for c in clients for j in c.terminal}
    assert len(done_at_kill) < JOBS // 2, "the kill must land with jobs in flight"

    # The worker goes on: wait until jobs that no client has seen finish are done, so
    # that the new gateway can only know them from the topic.
    async def finished_while_down() -> set[str]:
        records = await read_topic(stack.bootstrap, TOPICS.job_state.name)
        done = {k.decode() for k, v in records if decode_job_state(v).status.terminal}
        return done - done_at_kill

    while not (unseen := await finished_while_down()):
        assert time.monotonic() - killed_at < 60, "no job finished while the gateway was down"
        await asyncio.sleep(0.2)

    # A new gateway comes up on the same port, and the clients, retrying all along,
    # reconnect to it by themselves.
    second = stack.start_gateway(port=port)
    restart_s = time.monotonic() - killed_at
    await asyncio.wait_for(followed, 120)
    print(
        f"\ngateway back after {restart_s:.1f}s; {len(done_at_kill)}/{JOBS} done at the kill, "
        f"{len(unseen)} more while it was down"
    )

    status_now = {j: second.status(j).json() for j in job_ids}
    assert {s["status"] for s in status_now.values()} == {"SUCCESS"}
    for client in clients:
        assert set(client.terminal) == set(client.job_ids)
        for job_id, message in client.terminal.items():
            assert message == status_now[job_id]
        for received in client.connections:
            for statuses in received.values():
                assert statuses == sorted(statuses, key=ORDER.index), statuses
                assert len(set(statuses)) == len(statuses), f"pushed twice: {statuses}"
        # It lost its connection(s) and came back to the new gateway.
        assert len(client.connections) > (1 if client.one_socket else len(client.job_ids))

    # Jobs that finished while no gateway was up: a reconnected client's first (and
    # only) message was their current state, SUCCESS, from the rebuilt view.
    for client in clients:
        for job_id in unseen & set(client.job_ids):
            last = [r[job_id] for r in client.connections if job_id in r][-1]
            assert last == ["SUCCESS"], last
