"""Load: many jobs from many concurrent HTTP clients on the tiny model; nothing is lost.

Prints throughput, end-to-end latency percentiles and process memory; the assertions
are about correctness (every job SUCCESS, one caption each) and about memory not
growing per job (a leak detector), never about speed. Sizes: CAPTIONSTREAM_LOAD_JOBS
(default 1000) and CAPTIONSTREAM_LOAD_CLIENTS (default 100).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from captionstream.schemas.events import CaptionProduced, decode_caption_event
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack, own_stack, read_topic

JOBS = int(os.environ.get("CAPTIONSTREAM_LOAD_JOBS", "1000"))
CLIENTS = int(os.environ.get("CAPTIONSTREAM_LOAD_CLIENTS", "100"))


def rss_mib(component: Component) -> float:
    status = Path(f"/proc/{component.proc.pid}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return kib / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@pytest.fixture
def load_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(tmp_path_factory.mktemp("load"), CAPTIONSTREAM_MAX_BATCH_SIZE="16") as stack:
        yield stack


async def run_clients(gateway: Gateway, jobs: int, clients: int, salt: int) -> list[str]:
    """`clients` concurrent clients, each uploading its share of `jobs` images."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(jobs):
        queue.put_nowait(i)
    job_ids: list[str] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            while not queue.empty():
                i = queue.get_nowait()
                image = make_png(8 + i % 64, 8 + i // 64 % 64, color=(salt, i % 256, i // 256))
                response = await http.post("/api/v1/upload", files={"file": ("i.png", image)})
                assert response.status_code == 202, response.text
                job_ids.append(response.json()["job_id"])

    await asyncio.gather(*(client() for _ in range(clients)))
    return job_ids


async def wait_all_done(stack: Stack, job_ids: set[str], timeout_s: float) -> dict[str, float]:
    """Job id -> end-to-end seconds, from the captions topic, once every job has one."""
    deadline = time.monotonic() + timeout_s
    while True:
        latencies: dict[str, float] = {}
        for key, value in await read_topic(stack.bootstrap, TOPICS.captions.name, timeout_s=60):
            event = decode_caption_event(value)
            assert isinstance(event, CaptionProduced), event
            latencies[key.decode()] = (event.produced_at - event.submitted_at).total_seconds()
        if job_ids <= set(latencies):
            return {j: latencies[j] for j in job_ids}
        assert time.monotonic() < deadline, f"{len(job_ids - set(latencies))} jobs unfinished"
        await asyncio.sleep(1)


async def one_round(stack: Stack, gateway: Gateway, jobs: int, salt: int) -> dict[str, float]:
    started = time.monotonic()
    job_ids = await run_clients(gateway, jobs, CLIENTS, salt)
    assert len(set(job_ids)) == jobs
    latencies = await wait_all_done(stack, set(job_ids), timeout_s=300)
    elapsed = time.monotonic() - started
    values = list(latencies.values())
    print(
        f"\nround {salt}: {jobs} jobs from {CLIENTS} clients in {elapsed:.1f} s "
        f"= {jobs / elapsed:.1f} jobs/s; end-to-end p50 {percentile(values, 50):.2f} s, "
        f"p95 {percentile(values, 95):.2f} s, p99 {percentile(values, 99):.2f} s"
    )
    statuses = {gateway.status(j).json()["status"] for j in job_ids[:: max(1, jobs // 50)]}
    assert statuses == {"SUCCESS"}
    return latencies


@pytest.mark.soak  # `make soak`: 70-100 s, more than `make test` can spend on one run
@pytest.mark.timeout(900)
async def test_load_nothing_lost_and_memory_flat(load_stack: Stack) -> None:
    worker = load_stack.start_worker()
    gateway = load_stack.start_gateway()
    assert gateway.component is not None

    def rss() -> dict[str, float]:
        assert gateway.component is not None
        return {"gateway": rss_mib(gateway.component), "worker": rss_mib(worker)}

    # The load itself; it also warms every cache (rocksdb memtables and block cache,
    # allocator arenas). Memory is then sampled over three smaller rounds: a leak grows
    # it in every round, while warming (seen here: one step of ~40 MiB early on) does not.
    await one_round(load_stack, gateway, JOBS, salt=1)
    per_round = JOBS // 4
    samples = []
    for salt in (2, 3, 4):
        await one_round(load_stack, gateway, per_round, salt=salt)
        samples.append(rss())
    for name in ("gateway", "worker"):
        series = [sample[name] for sample in samples]
        print(
            f"{name}: RSS after the last three rounds: {', '.join(f'{m:.0f}' for m in series)} MiB"
        )
        # Each job's state stays in the job view and table until its TTL: a few KiB per
        # job is expected; a leak of images or model activations would be far more.
        least = min(later - earlier for earlier, later in itertools.pairwise(series))
        per_job_kib = least * 1024 / per_round
        assert per_job_kib < 20, f"{name} grew {per_job_kib:.1f} KiB per job in every round"
