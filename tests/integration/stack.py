"""Real processes for integration tests: the embedded broker, workers and gateways.

Each component runs as its own `captionstream` process, exactly as in production; tests
talk to them over HTTP, WebSocket and the Kafka protocol. Spawning, readiness and stopping
are bench/harness.py's, shared with the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import Component, S3Server, answers_ok, spawn_part, wait_until
from captionstream.apache_kafka import ApacheKafkaCluster
from captionstream.broker import MEMORY_STORAGE, EmbeddedBroker, free_port
from captionstream.kafka import KafkaConnection, assign_whole_topic, fetch_highwaters
from captionstream.schemas.events import CaptionProduced, caption_event_id, decode_caption_event
from captionstream.schemas.topics import TOPICS
from captionstream.settings import KafkaProfile
from tests.helpers.images import make_png
from tests.helpers.jobs import TERMINAL


@dataclass
class Stack:
    """Starts components sharing one broker and one data dir; stops them all at the end."""

    bootstrap: str
    data_dir: Path
    log_dir: Path
    components: list[Component] = field(default_factory=list)
    spawn_env: dict[str, str] = field(default_factory=dict)  # for every later spawn
    broker: EmbeddedBroker | None = None  # the stack's own broker (`own_stack`), if any
    # The broker under test: `embedded` (Tansu) or `apache` (Apache Kafka).
    broker_kind: str = "embedded"
    cluster: ApacheKafkaCluster | None = None  # the stack's own Apache Kafka, if any

    @property
    def profile(self) -> KafkaProfile:
        return KafkaProfile.EMBEDDED if self.broker_kind == "embedded" else KafkaProfile.KAFKA

    @property
    def kafka(self) -> KafkaConnection:
        """A connection like the components' (for the test's own clients)."""
        return KafkaConnection(self.bootstrap, self.profile, client_id="captionstream-tests")

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP": self.bootstrap,
            "CAPTIONSTREAM_KAFKA_PROFILE": self.profile.value,
            "CAPTIONSTREAM_DATA_DIR": str(self.data_dir),
            "CAPTIONSTREAM_MODEL": "tiny-blip",
            "CAPTIONSTREAM_MAX_BATCH_WAIT_S": "0.05",
            "HF_HUB_OFFLINE": "1",
            **self.spawn_env,
            **extra,
        }
        # The fault-test captioners (tests/integration/flaky.py) mostly sleep: timing
        # torch threads on them at start (processor/threads.py) measures nothing and
        # cost a worker six captions (30 s at 5 s an image).
        if env.get("CAPTIONSTREAM_CAPTIONER", "").startswith("tests.integration.flaky"):
            env.setdefault("CAPTIONSTREAM_TORCH_THREADS", "1")
        return env

    def spawn(self, part: str, *args: str, url: str | None = None, **env: str) -> Component:
        log_path = self.log_dir / f"{part}-{len(self.components)}.log"
        component = spawn_part(part, *args, env=self.env(**env), log_path=log_path, url=url)
        self.components.append(component)
        return component

    def start_worker(self, timeout_s: float = 60, **env: str) -> Component:
        """A worker serving /healthz, /readyz and /metrics on a free port (`.url`)."""
        (worker,) = self.start_workers(1, timeout_s, **env)
        return worker

    def start_workers(self, count: int, timeout_s: float = 60, **env: str) -> list[Component]:
        """`count` workers started side by side (their model loads overlap), each ready."""
        workers = []
        for _ in range(count):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            workers.append(
                self.spawn("worker", url=url, CAPTIONSTREAM_METRICS_PORT=str(port), **env)
            )
        for worker in workers:
            worker.wait_ready(timeout_s)
        return workers

    def start_gateway(
        self, timeout_s: float = 60, port: int | None = None, ready: bool = True, **env: str
    ) -> Gateway:
        """A gateway on `port` (default: a free one), ready (`ready=False`: serving, for
        one that cannot reach its Kafka); `env` adds settings for this gateway only."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        component = self.spawn("gateway", url=url, CAPTIONSTREAM_PORT=str(port), **env)
        component.wait_ready(timeout_s, "/readyz" if ready else "/healthz")
        return Gateway(url, component)

    def stop_all(self) -> None:
        for component in reversed(self.components):
            component.stop()


@dataclass
class Gateway:
    url: str
    component: Component | None = None  # None when another process supervises it

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def healthy(self) -> bool:
        return answers_ok(f"{self.url}/healthz")

    def upload(
        self, data: bytes, filename: str = "image.png", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return httpx.post(
            f"{self.url}/api/v1/upload",
            files={"file": (filename, data)},
            headers=headers,
            timeout=30,
        )

    def status(self, job_id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/api/v1/status/{job_id}", timeout=10)

    def wait_terminal(self, job_id: str, timeout_s: float = 60) -> dict[str, object]:
        body: dict[str, object] = {}

        def done() -> bool:
            nonlocal body
            response = self.status(job_id)
            body = response.json() if response.status_code == 200 else {}
            return body.get("status") in TERMINAL

        wait_until(done, timeout_s, f"job {job_id} to finish")
        return body

    async def statuses(
        self, job_ids: list[str], max_connections: int = 100
    ) -> dict[str, dict[str, object]]:
        """The status body of each job, fetched concurrently."""
        limits = httpx.Limits(max_connections=max_connections)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(*(client.get(f"/api/v1/status/{j}") for j in job_ids))
        return {j: r.json() for j, r in zip(job_ids, responses, strict=True)}


def joined_generation(log: str) -> int | None:
    """The generation of the group this worker last joined, from its log."""
    joined = re.findall(r"Joined group '[^']*' \(generation (\d+)\)", log)
    return int(joined[-1]) if joined else None


def wait_for_one_generation(*workers: Component, timeout_s: float = 60) -> None:
    """Until every worker has joined the group and all joined the same generation: each
    owns partitions before load starts."""

    def generations() -> set[int | None]:
        return {joined_generation(worker.log()) for worker in workers}

    wait_until(
        lambda: None not in generations() and len(generations()) == 1,
        timeout_s,
        "the group to rebalance over every worker",
    )


async def sigkill_mid_batch(
    stack: Stack, worker: Component, after_results: int = 8, data_dir: Path | None = None
) -> None:
    """SIGKILL `worker` in the middle of a batch, once `after_results` of its captions are
    out (the captioners of tests.integration.flaky mark a batch in flight with a file in
    the worker's data directory: `data_dir`, when not the stack's)."""
    await asyncio.to_thread(
        wait_until,
        lambda: worker.log().count("captioned") >= after_results,
        60,
        "the first results",
        0.1,
    )
    inflight = (data_dir or stack.data_dir) / f"inflight-{worker.proc.pid}"
    await asyncio.to_thread(wait_until, inflight.exists, 30, "the worker mid-batch", 0.02)
    worker.kill()


async def all_succeed(
    gateway: Gateway, job_ids: list[str], timeout_s: float = 180
) -> dict[str, dict[str, object]]:
    """Wait (polling status, as clients do) until every job is finished; each must be
    SUCCESS. Returns the final status of each job."""

    def unfinished() -> int:
        views = asyncio.run(gateway.statuses(job_ids))
        return sum(v["status"] not in TERMINAL for v in views.values())

    await asyncio.to_thread(wait_until, lambda: unfinished() == 0, timeout_s, "every job", 1.0)
    views = await gateway.statuses(job_ids)
    assert {v["status"] for v in views.values()} == {"SUCCESS"}
    return views


async def submit_images(gateway: Gateway, count: int, first: int = 0) -> list[str]:
    """Upload `count` distinct small PNGs, 16 at a time; each must be accepted (202)."""
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=30) as client:

        async def one(i: int) -> str:
            image = make_png(16 + i % 50, 16 + i // 50 % 50, color=(i % 256, i // 256 % 256, 9))
            response = await client.post("/api/v1/upload", files={"file": (f"{i}.png", image)})
            assert response.status_code == 202, response.text
            return str(response.json()["job_id"])

        return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))


async def read_topic(
    bootstrap: str, topic: str, timeout_s: float = 5, *, committed_only: bool = False
) -> list[tuple[bytes, bytes]]:
    """All (key, value) records of `topic`, read from the beginning with a plain consumer;
    `committed_only`: as a read_committed consumer (no record of an aborted or open
    transaction; Apache Kafka only)."""
    isolation = "read_committed" if committed_only else "read_uncommitted"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
    )
    await consumer.start()
    try:
        tps = await assign_whole_topic(consumer, topic)
        # Not end_offsets(): ListOffsets is too low on the embedded broker's s3:// storage.
        # Read committed: up to the last stable offset (the kafka profile's readers).
        profile = KafkaProfile.KAFKA if committed_only else KafkaProfile.EMBEDDED
        ends = await fetch_highwaters(KafkaConnection(bootstrap, profile), tps)
        records: list[tuple[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"could not read {topic} up to {ends}")
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend((r.key, r.value) for r in batch)
        return records
    finally:
        await consumer.stop()


async def check_one_caption_per_job(
    bootstrap: str,
    views: dict[str, dict[str, object]],
    job_ids: list[str],
    timeout_s: float = 5,
) -> dict[str, set[str]]:
    """Read the captions topic and check that each of `job_ids` has exactly one caption
    (redelivered copies agree and carry the job's one event id), the one its status in
    `views` answers. Returns the distinct captions per job id on the topic."""
    captions: dict[str, set[str]] = defaultdict(set)
    event_ids: dict[str, set[str]] = defaultdict(set)
    for key, value in await read_topic(bootstrap, TOPICS.captions.name, timeout_s):
        event = decode_caption_event(value)
        assert isinstance(event, CaptionProduced)
        captions[key.decode()].add(event.caption)
        event_ids[key.decode()].add(event.event_id)
    for job_id in job_ids:
        assert len(captions[job_id]) == 1, f"job {job_id}: captions {captions[job_id]}"
        submitted_at = datetime.fromisoformat(str(views[job_id]["submitted_at"]))
        assert event_ids[job_id] == {caption_event_id(job_id, submitted_at)}
        result = views[job_id]["result"]
        assert isinstance(result, dict)
        assert result["caption"] in captions[job_id]
    return dict(captions)


@contextlib.contextmanager
def stack_on(cluster: ApacheKafkaCluster, root: Path, **spawn_env: str) -> Iterator[Stack]:
    """A stack on a running Apache Kafka (its data and logs under `root`); its
    components are stopped on exit, the cluster is left running."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(
        bootstrap=cluster.bootstrap,
        data_dir=root / "data",
        log_dir=root / "logs",
        broker_kind="apache",
        cluster=cluster,
        spawn_env=dict(spawn_env),
    )
    try:
        yield stack
    finally:
        stack.stop_all()


@contextlib.contextmanager
def own_stack(
    root: Path, s3: S3Server | None = None, broker_kind: str = "embedded", **spawn_env: str
) -> Iterator[Stack]:
    """A stack on a broker of its own, for tests whose workers must not join the
    session's consumer group (fault injection, kills, load); stopped on exit.

    `broker_kind`: `embedded` (Tansu) or `apache` (a one-node Apache Kafka of its own,
    `stack.cluster`; durable). With `s3`, the embedded broker stores everything there
    (durable: `stack.broker` can be stopped and started again without losing topics,
    records or committed offsets)."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    if broker_kind == "apache":
        assert s3 is None, "s3:// storage is the embedded broker's"
        from tests.integration.apache import require_apache_kafka

        require_apache_kafka()
        with (
            ApacheKafkaCluster(root / "kafka", nodes=1) as cluster,
            stack_on(cluster, root, **spawn_env) as stack,
        ):
            yield stack
        return
    broker = EmbeddedBroker(
        port=free_port(),
        log_file=root / "tansu.log",
        storage=MEMORY_STORAGE if s3 is None else s3.storage,
        env=None if s3 is None else s3.tansu_env(),
    )
    with broker:
        stack = Stack(
            bootstrap=broker.bootstrap,
            data_dir=root / "data",
            log_dir=root / "logs",
            broker=broker,
        )
        stack.spawn_env.update(spawn_env)
        try:
            yield stack
        finally:
            stack.stop_all()


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a component's /metrics: {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(root: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving `root`: a host the images come from by URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
