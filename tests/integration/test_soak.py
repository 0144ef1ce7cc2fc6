"""Soak: a steady stream of submissions for minutes while the broker (on durable S3
storage) and the gateway are killed and restarted in turn; the worker is never restarted.

Deselected by default; run with `make soak` (`pytest -m soak`). At the end every job a
gateway accepted (202) is SUCCESS with exactly one caption, no refused submission (503)
left a trace, and the worker is still the process it was at the start.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from captionstream.broker import free_port
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.helpers.jobs import TERMINAL
from tests.integration.stack import Stack, check_one_caption_per_job, read_topic

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1200)]

CYCLES = 3  # each: broker SIGKILL, gateway SIGKILL, broker SIGTERM
# Not here: restarting a *worker* against s3:// storage, which test_worker_restart_s3.py
# covers (Tansu answers ListOffsets too low on that storage; the embedded profile reads
# end offsets from fetches instead: docs/kafka.md, "End offsets on s3://").
SETTLE_S = 10  # load between faults
BROKER_OUTAGE_S = 10  # longer than the embedded profile's 4 s session timeout


@dataclass
class Load:
    """Submits distinct images, one at a time, `interval_s` apart, until stopped."""

    url: str
    interval_s: float
    accepted: list[str] = field(default_factory=list)
    refused: int = 0  # 503: the broker is down
    unsure: int = 0  # no answer (the gateway died or was not up): may or may not be a job
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.wait(self.interval_s):
                i += 1
                image = make_png(16 + i % 64, 16 + (i // 64) % 64, color=(i % 256, i // 256, 5))
                try:
                    response = client.post("/api/v1/upload", files={"file": (f"{i}.png", image)})
                except httpx.TransportError:
                    self.unsure += 1
                    continue
                if response.status_code == 202:
                    self.accepted.append(str(response.json()["job_id"]))
                else:
                    assert response.status_code == 503, response.text
                    self.refused += 1


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def test_soak_restarts_under_steady_load(durable_stack: Stack) -> None:
    stack = durable_stack
    broker = stack.broker
    assert broker is not None
    worker = stack.start_worker()
    port = free_port()
    gateways = [stack.start_gateway(port=port, CAPTIONSTREAM_KAFKA_TIMEOUT_S="3")]
    load = Load(gateways[0].url, interval_s=0.4)
    thread = threading.Thread(target=load.run, name="load", daemon=True)
    thread.start()
    report: list[str] = []

    def accepted_count() -> int:
        return len(load.accepted)

    def progress(after: int) -> Callable[[], bool]:
        """True once a job accepted after the fault has finished."""

        def check() -> bool:
            new = load.accepted[after:]
            if not new:
                return False
            return gateways[-1].status(new[0]).json().get("status") in TERMINAL

        return check

    try:
        for cycle in range(CYCLES):
            for fault in ("broker-kill", "gateway-kill", "broker-term"):
                time.sleep(SETTLE_S)
                before = accepted_count()
                started = time.monotonic()
                if fault.startswith("broker"):
                    broker.stop(sig=signal.SIGKILL if fault == "broker-kill" else signal.SIGTERM)
                    time.sleep(BROKER_OUTAGE_S)
                    broker.start()
                else:
                    old = gateways[-1].component
                    assert old is not None
                    old.stop(signal.SIGKILL)
                    gateways.append(
                        stack.start_gateway(port=port, CAPTIONSTREAM_KAFKA_TIMEOUT_S="3")
                    )
                back_s = time.monotonic() - started
                flowing_s = wait_for(progress(before), 120, f"jobs to flow after {fault}")
                report.append(
                    f"cycle {cycle} {fault}: back after {back_s:.1f}s, a new job finished "
                    f"{flowing_s:.1f}s later"
                )
    finally:
        load.stop.set()
        thread.join(60)

    gateway = gateways[-1]
    accepted = load.accepted

    def all_done() -> bool:
        views = asyncio.run(gateway.statuses(accepted, max_connections=16))
        return all(v.get("status") in TERMINAL for v in views.values())

    drain_s = wait_for(all_done, 300, "every accepted job to finish")
    views = asyncio.run(gateway.statuses(accepted, max_connections=16))
    print(
        "\n" + "\n".join(report) + f"\n{len(accepted)} accepted, {load.refused} refused (503), "
        f"{load.unsure} unanswered; backlog drained {drain_s:.1f}s after the load stopped"
    )
    assert {v["status"] for v in views.values()} == {"SUCCESS"}
    assert load.refused > 0, "submissions were refused while the broker was down"
    assert worker.alive(), "the worker rode out every broker and gateway restart"
    assert gateway.component is not None
    assert gateway.component.alive()

    asyncio.run(check_one_caption_per_job(stack.bootstrap, views, accepted, timeout_s=30))
    # A refused submission leaves no job; only unanswered ones may have become jobs.
    images = {k.decode() for k, _ in asyncio.run(read_topic(stack.bootstrap, TOPICS.images.name))}
    assert images >= set(accepted)
    assert len(images - set(accepted)) <= load.unsure
