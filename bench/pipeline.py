"""The whole pipeline: HTTP upload -> gateway -> Kafka -> worker -> caption event.

Starts a broker (the embedded Tansu broker, or a one-node Apache Kafka as
`captionstream up --broker apache` runs it), one `python -m captionstream worker` and one
gateway as separate processes (as `make run` does), then drives them with a closed loop of
`in_flight` async clients: each uploads an image, waits for its `caption.produced` event
on the public captions topic, and uploads the next. A job's end-to-end latency is
`produced_at - submitted_at` from its event; the client-side view (upload sent ..
event received) is recorded too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer

from bench.harness import Component, spawn_part
from bench.stats import JobTimes, PairedRound, PipelineRun, group_batches, stage_medians
from bench.system import DISTURBED_CORES, CpuMeter, minor_faults, wait_for_quiet
from captionstream.apache_kafka import KAFKA_VERSION, ApacheKafkaCluster
from captionstream.broker import EmbeddedBroker, child_preexec, free_port
from captionstream.kafka import assign_whole_topic
from captionstream.schemas.events import (
    CaptionFailed,
    CaptionProduced,
    JobState,
    decode_caption_event,
    decode_job_state,
)
from captionstream.schemas.topics import TOPICS
from captionstream.settings import BrokerKind, KafkaProfile

Progress = Callable[[str], None]

# What each broker is, in the report.
BROKER_TITLES = {
    BrokerKind.EMBEDDED: "embedded broker (Tansu)",
    BrokerKind.APACHE: f"Apache Kafka {KAFKA_VERSION} (one KRaft node)",
}
# The client tuning each broker gets, as `captionstream up` picks it.
BROKER_PROFILES = {
    BrokerKind.EMBEDDED: KafkaProfile.EMBEDDED,
    BrokerKind.APACHE: KafkaProfile.KAFKA,
}

Broker = EmbeddedBroker | ApacheKafkaCluster


def broker_pids(broker: Broker) -> dict[str, int]:
    """Process ids of the broker's running processes, by role."""
    if isinstance(broker, ApacheKafkaCluster):
        one = broker.nodes == 1
        return {
            "broker (Apache Kafka)" if one else f"broker (Apache Kafka node {i})": pid
            for i, pid in broker.pids.items()
        }
    return {} if broker.pid is None else {"broker (Tansu)": broker.pid}


@dataclass
class Stack:
    broker: Broker
    worker: Component
    gateway: Component
    run_dir: Path

    @property
    def gateway_url(self) -> str:
        assert self.gateway.url is not None
        return self.gateway.url

    @property
    def pids(self) -> list[int]:
        return list(self.components().values())

    def components(self) -> dict[str, int]:
        """Process ids by role, this benchmark's own process included."""
        pids = {"worker": self.worker.pid, "gateway": self.gateway.pid}
        pids.update(broker_pids(self.broker))
        pids["benchmark clients"] = os.getpid()
        return pids


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the stack is being stopped (main thread only), so a
    second one cannot cut the shutdown short and leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def start_broker(kind: BrokerKind, run_dir: Path) -> Broker:
    """A fresh broker of `kind` with its files in `run_dir`, started. Call from the main
    thread: each Apache Kafka JVM dies with the thread that started it."""
    if kind is BrokerKind.APACHE:
        # As `captionstream up --broker apache`: one node, replication factor 1.
        return ApacheKafkaCluster(run_dir / "kafka", nodes=1).start()
    return EmbeddedBroker(port=free_port(), log_file=run_dir / "broker.log").start()


@contextmanager
def running_stack(
    *,
    model_dir: Path,
    cache_dir: Path,
    precision: str,
    device: str,
    max_batch_size: int,
    max_batch_wait_s: float,
    new_tokens: int,
    keep: bool,
    progress: Progress,
    worker_env: Mapping[str, str] | None = None,
    broker: BrokerKind = BrokerKind.EMBEDDED,
) -> Iterator[Stack]:
    """Broker, worker and gateway, ready; all stopped on exit (an exception, Ctrl-C or a
    SIGTERM that raises included)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"pipeline-{broker.value}-", dir=cache_dir))
    processes: list[Component] = []
    running: Broker | None = None

    def spawn(part: str, env: Mapping[str, str], port: int) -> Component:
        process = spawn_part(
            part,
            env=env,
            log_path=run_dir / f"{part}.log",
            url=f"http://127.0.0.1:{port}",
            preexec_fn=child_preexec(),  # gone with this process, even if killed
        )
        processes.append(process)
        return process

    failed = False
    try:
        progress(f"pipeline: starting the {BROKER_TITLES[broker]}")
        running = start_broker(broker, run_dir)
        env = {
            **os.environ,
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP": running.bootstrap,
            "CAPTIONSTREAM_KAFKA_PROFILE": BROKER_PROFILES[broker].value,
            "CAPTIONSTREAM_DATA_DIR": str(run_dir / "data"),
            "CAPTIONSTREAM_MODEL": str(model_dir),
            "CAPTIONSTREAM_DEVICE": device,
            "CAPTIONSTREAM_PRECISION": precision,
            "CAPTIONSTREAM_MAX_BATCH_SIZE": str(max_batch_size),
            "CAPTIONSTREAM_MAX_BATCH_WAIT_S": str(max_batch_wait_s),
            "CAPTIONSTREAM_MAX_NEW_TOKENS": str(new_tokens),
            "HF_HUB_OFFLINE": "1",
        }
        progress(f"pipeline: broker on {running.bootstrap}; starting worker and gateway")
        port = free_port()  # the worker's /readyz comes with its metrics port
        worker = spawn(
            "worker", {**env, **(worker_env or {}), "CAPTIONSTREAM_METRICS_PORT": str(port)}, port
        )
        port = free_port()
        gateway = spawn(
            "gateway",
            {**env, "CAPTIONSTREAM_HOST": "127.0.0.1", "CAPTIONSTREAM_PORT": str(port)},
            port,
        )
        worker.wait_ready(600)
        gateway.wait_ready(120)
        progress("pipeline: worker and gateway ready")
        yield Stack(running, worker, gateway, run_dir)
    except Exception:  # not on Ctrl-C / SIGTERM: just stop
        failed = True
        progress(f"pipeline failed; logs kept in {run_dir}")
        for process in processes:
            progress(f"--- last lines of the {process.name} log ({process.log_path}) ---")
            progress(process.tail(30))
        raise
    finally:
        with _signals_held():
            for process in reversed(processes):
                process.stop(timeout_s=30)
            if running is not None:
                running.stop()
        if not failed and not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


@dataclass(frozen=True)
class JobResult:
    event: CaptionProduced | CaptionFailed
    client_latency_s: float

    @property
    def latency_s(self) -> float:
        end = self.event.produced_at if isinstance(self.event, CaptionProduced) else None
        if end is None:
            assert isinstance(self.event, CaptionFailed)
            end = self.event.failed_at
        return (end - self.event.submitted_at).total_seconds()


class CaptionWaiter:
    """Reads the public captions topic and hands each job's event to whoever waits for it."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._seen: dict[str, asyncio.Future[tuple[CaptionProduced | CaptionFailed, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    def _future(self, job_id: str) -> asyncio.Future[tuple[CaptionProduced | CaptionFailed, float]]:
        if job_id not in self._seen:
            self._seen[job_id] = asyncio.get_running_loop().create_future()
        return self._seen[job_id]

    async def start(self) -> None:
        await self.consumer.start()
        try:
            # Every partition, from the beginning. Not from the metadata the consumer got
            # at its start: on Apache Kafka that lacked the topic, and `topics()` fetches
            # fresh metadata without keeping it.
            await assign_whole_topic(self.consumer, TOPICS.captions.name)
        except BaseException:
            await self.consumer.stop()
            raise
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            received = time.monotonic()
            for records in batches.values():
                for record in records:
                    event = decode_caption_event(record.value)
                    future = self._future(event.job_id)
                    if not future.done():
                        future.set_result((event, received))

    async def wait(
        self, job_id: str, timeout_s: float
    ) -> tuple[CaptionProduced | CaptionFailed, float]:
        if self._task is not None and self._task.done():
            self._task.result()  # the reader crashed: raise its exception here
        return await asyncio.wait_for(asyncio.shield(self._future(job_id)), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.consumer.stop()


async def final_states(
    bootstrap: str, job_ids: set[str], timeout_s: float = 30
) -> dict[str, JobState]:
    """The terminal state of each of `job_ids`, read from the job-state topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await assign_whole_topic(consumer, TOPICS.job_state.name)
        found: dict[str, JobState] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(job_ids) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    state = decode_job_state(record.value)
                    if state.job_id in job_ids and state.status.terminal:
                        found[state.job_id] = state
        return found
    finally:
        await consumer.stop()


def job_times(results: Sequence[JobResult], states: dict[str, JobState]) -> list[JobTimes]:
    times = []
    for r in results:
        state = states.get(r.event.job_id)
        if not isinstance(r.event, CaptionProduced) or state is None:
            continue
        if state.started_at is None or state.finished_at is None:
            continue
        times.append(
            JobTimes(
                started=state.started_at.timestamp(),
                produced=r.event.produced_at.timestamp(),
                finished=state.finished_at.timestamp(),
            )
        )
    return times


async def closed_loop(
    http: httpx.AsyncClient,
    waiter: CaptionWaiter,
    jpegs: Sequence[bytes],
    in_flight: int,
    job_timeout_s: float,
    on_done: Callable[[JobResult], None],
) -> list[JobResult]:
    todo = iter(enumerate(jpegs))  # shared: each client takes the next image
    results: list[JobResult] = []

    async def client() -> None:
        for i, data in todo:
            sent = time.monotonic()
            response = await http.post(
                "/api/v1/upload", files={"file": (f"bench-{i}.jpg", data, "image/jpeg")}
            )
            if response.status_code != 202:
                raise RuntimeError(f"upload answered {response.status_code}: {response.text}")
            job_id = response.json()["job_id"]
            event, received = await waiter.wait(job_id, job_timeout_s)
            result = JobResult(event, received - sent)
            results.append(result)
            on_done(result)

    await asyncio.gather(*(client() for _ in range(min(in_flight, len(jpegs)))))
    return results


@dataclass(frozen=True)
class Drive:
    wall_s: float
    results: list[JobResult]
    other_cores: float | None
    idle_cores: float | None
    stolen_cores: float | None
    states: dict[str, JobState]
    cores: dict[str, tuple[float | None, int | None]]  # per process: (cores, page faults)
    paired: list[PairedRound]


@dataclass(frozen=True)
class Pairing:
    """Paired rounds after the main run: `bare_batch()` times one bare batch of
    `batch_size` in this process (blocking: the worker is idle meanwhile), then a closed
    loop captions each of `segments` through the pipeline."""

    bare_batch: Callable[[], float]
    batch_size: int
    segments: Sequence[Sequence[bytes]]


async def _paired_rounds(
    http: httpx.AsyncClient,
    waiter: CaptionWaiter,
    pairing: Pairing,
    in_flight: int,
    progress: Progress,
) -> list[PairedRound]:
    rounds = []
    for i, segment in enumerate(pairing.segments, 1):
        bare_s = pairing.bare_batch()  # blocks the loop on purpose: nothing else runs
        start = time.monotonic()
        await closed_loop(http, waiter, segment, in_flight, 600, lambda r: None)
        found = PairedRound(pairing.batch_size, bare_s, len(segment), time.monotonic() - start)
        rounds.append(found)
        progress(
            f"paired round {i}/{len(pairing.segments)}: bare {found.bare_images_per_s:.2f}, "
            f"pipeline {found.pipeline_images_per_s:.2f} images/s ({found.ratio:.2f}x)"
        )
    return rounds


async def _drive(
    stack: Stack,
    warmup: Sequence[bytes],
    timed: Sequence[bytes],
    in_flight: int,
    progress: Progress,
    quiet_wait_s: float,
    pairing: Pairing | None = None,
) -> Drive:
    waiter = CaptionWaiter(stack.broker.bootstrap)
    await waiter.start()
    try:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as http:
            if warmup:
                t0 = time.monotonic()
                await closed_loop(http, waiter, warmup, len(warmup), 600, lambda r: None)
                progress(f"pipeline: warm-up {len(warmup)} images {time.monotonic() - t0:.1f} s")
            if quiet_wait_s > 0:
                await asyncio.to_thread(
                    wait_for_quiet,
                    DISTURBED_CORES,
                    timeout_s=quiet_wait_s,
                    pids=stack.pids,
                    progress=progress,
                )
            done = 0
            start = time.monotonic()

            def on_done(result: JobResult) -> None:
                nonlocal done
                done += 1

            async def report() -> None:
                while True:
                    await asyncio.sleep(5)
                    elapsed = time.monotonic() - start
                    progress(
                        f"pipeline: {done}/{len(timed)} captions in {elapsed:.0f} s "
                        f"({done / elapsed:.2f} images/s)"
                    )

            meter = CpuMeter(stack.pids)
            meter.start()
            faults = {name: minor_faults(pid) for name, pid in stack.components().items()}
            reporter = asyncio.create_task(report())
            try:
                results = await closed_loop(http, waiter, timed, in_flight, 600, on_done)
            finally:
                reporter.cancel()
            wall = time.monotonic() - start
            other = meter.stop()
            cores = {}
            for name, pid in stack.components().items():
                before, after = faults[name], minor_faults(pid)
                delta = None if before is None or after is None else after - before
                cores[name] = (meter.cores_of(pid), delta)
            ids = {r.event.job_id for r in results}
            states = await final_states(stack.broker.bootstrap, ids)
            paired = []
            if pairing is not None:
                paired = await _paired_rounds(http, waiter, pairing, in_flight, progress)
            return Drive(
                wall,
                results,
                other,
                meter.idle_cores(),
                meter.stolen_cores(),
                states,
                cores,
                paired,
            )
    finally:
        await waiter.stop()


def measure(
    *,
    model_dir: Path,
    cache_dir: Path,
    precision: str,
    device: str,
    max_batch_size: int,
    max_batch_wait_s: float,
    in_flight: int,
    warmup: Sequence[bytes],
    timed: Sequence[bytes],
    new_tokens: int,
    keep: bool,
    progress: Progress,
    quiet_wait_s: float = 0,
    worker_env: Mapping[str, str] | None = None,
    pairing: Pairing | None = None,
    broker: BrokerKind = BrokerKind.EMBEDDED,
) -> tuple[PipelineRun, list[PairedRound], str]:
    """Run the stack on `broker` and the load, then any paired rounds; returns the main
    run's result, the paired rounds and the worker's model log line."""
    with running_stack(
        model_dir=model_dir,
        cache_dir=cache_dir,
        precision=precision,
        device=device,
        max_batch_size=max_batch_size,
        max_batch_wait_s=max_batch_wait_s,
        new_tokens=new_tokens,
        keep=keep,
        progress=progress,
        worker_env=worker_env,
        broker=broker,
    ) as stack:
        drive = asyncio.run(
            _drive(stack, warmup, timed, in_flight, progress, quiet_wait_s, pairing)
        )
        loaded = next(
            (line for line in stack.worker.log().splitlines() if "loaded model" in line), ""
        )
    produced = [r for r in drive.results if isinstance(r.event, CaptionProduced)]
    events = [r.event for r in produced if isinstance(r.event, CaptionProduced)]
    run = PipelineRun(
        precision=precision,
        max_batch_size=max_batch_size,
        max_batch_wait_s=max_batch_wait_s,
        in_flight=in_flight,
        images=len(drive.results),
        wall_s=drive.wall_s,
        latencies_s=tuple(r.latency_s for r in produced),
        client_latencies_s=tuple(r.client_latency_s for r in produced),
        failed=len(drive.results) - len(produced),
        other_cores=drive.other_cores,
        idle_cores=drive.idle_cores,
        stolen_cores=drive.stolen_cores,
        batches=tuple(group_batches([e.produced_at.timestamp() for e in events])),
        stages=tuple(stage_medians(job_times(produced, drive.states)).items()),
        cores=tuple(
            (name, c, faults) for name, (c, faults) in drive.cores.items() if c is not None
        ),
    )
    return run, drive.paired, loaded
