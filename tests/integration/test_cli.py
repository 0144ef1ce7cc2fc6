"""The command line as users run it: `captionstream up` (what `make run` execs), stopping
without orphans, and failing fast on a bad model setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from captionstream.broker import free_port
from captionstream.schemas.events import decode_caption_event
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Gateway, wait_until


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONSTREAM_")}
    env.update(
        CAPTIONSTREAM_DATA_DIR=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def run_up_once(
    tmp_path: Path, log_path: Path, *args: str
) -> tuple[Gateway, subprocess.Popen[bytes]]:
    """Start `captionstream up ARGS` as a terminal would, on tmp_path's data dir; return
    once its gateway and worker serve."""
    port = free_port()
    env = clean_env(tmp_path, CAPTIONSTREAM_MODEL="tiny-blip", CAPTIONSTREAM_PORT=str(port))
    args = args or ("--broker-port", str(free_port()))
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "captionstream", "up", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, like a terminal job
            # As a script's background job gets it (and this suite, run that way): SIGINT
            # ignored on entry. Ctrl-C must still stop `up` cleanly, not just its children.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    gateway = Gateway(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: gateway.healthy() or up.poll() is not None, 60, "the gateway of `up`")
        wait_until(
            lambda: "[^Worker]: Ready" in log_path.read_text() or up.poll() is not None,
            60,
            "the worker",
        )
        assert up.poll() is None, f"`up` exited:\n{log_path.read_text()[-3000:]}"
    except BaseException:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        raise
    return gateway, up


def ctrl_c(up: subprocess.Popen[bytes]) -> None:
    """Ctrl-C as a terminal sends it; `up` exits 0 and leaves no process behind."""
    spawned = descendants(up.pid)
    assert len(spawned) >= 3, "broker, worker and gateway run as child processes"
    os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert up.wait(30) == 0
    wait_until(lambda: not any(running(p) for p in spawned), 10, "children to exit")


def test_up_ctrl_c_leaves_no_process_and_a_second_up_serves_as_the_first(
    tmp_path: Path,
) -> None:
    """`make run`, Ctrl-C, `make run` on the same data directory. The embedded broker
    keeps topics in memory, so the second broker starts empty while the worker's table
    state from the first run is still on disk: the worker discards it (one warning) and
    serves, where it used to crash on Faust's ConsistencyError and take the stack down."""
    first_job = ""
    for run in (1, 2):
        log_path = tmp_path / f"up-{run}.log"
        gateway, up = run_up_once(tmp_path, log_path)
        try:
            job_id = httpx.post(
                f"{gateway.url}/api/v1/upload", files={"file": ("a.png", make_png())}
            ).json()["job_id"]
            assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
            if run == 1:
                first_job = job_id
            else:
                # Memory storage: the first run's jobs went with its broker (documented).
                assert gateway.status(first_job).status_code == 404
            ctrl_c(up)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
    first, second = ((tmp_path / f"up-{run}.log").read_text() for run in (1, 2))
    assert "discarding local table state" not in first
    assert second.count("discarding local table state") == 1
    assert "ConsistencyError" not in second


@pytest.mark.brokers("apache")
async def test_up_on_apache_kafka_serves_and_downstream_consumers_read_captions(
    tmp_path: Path, broker_kind: str
) -> None:
    """`captionstream up --broker apache`: upload -> WebSocket -> status on a real Apache
    Kafka, whose captions topic a plain librdkafka consumer (confluent-kafka) reads, as
    a downstream service would. Ctrl-C leaves no process, the JVM included."""
    from confluent_kafka import Consumer

    from tests.integration.apache import require_apache_kafka

    require_apache_kafka()
    log_path = tmp_path / "up.log"
    gateway, up = run_up_once(tmp_path, log_path, "--broker", "apache")
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            uploaded = await http.post("/api/v1/upload", files={"file": ("a.png", make_png())})
        job_id = uploaded.json()["job_id"]
        async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/{job_id}") as ws:
            pushed = [json.loads(message) async for message in ws]
        assert pushed[-1]["status"] == "SUCCESS", pushed
        status = gateway.status(job_id).json()
        assert status["result"] == pushed[-1]["result"]

        layout = json.loads((tmp_path / "data" / "apache-kafka" / "cluster.json").read_text())
        bootstrap = ",".join(f"127.0.0.1:{n['client']}" for n in layout["nodes"].values())
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "downstream-test",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        consumer.subscribe([TOPICS.captions.name])
        events = []
        try:
            deadline = time.monotonic() + 30
            while not events and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is not None and message.error() is None:
                    events.append(decode_caption_event(message.value()))
        finally:
            consumer.close()
        assert [(e.job_id, getattr(e, "caption", None)) for e in events] == [
            (job_id, status["result"]["caption"])
        ]
        ctrl_c(up)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert "Apache Kafka 4.4.0" in log_path.read_text()


def test_sigterm_to_up_stops_its_children(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, CAPTIONSTREAM_MODEL="tiny-blip", CAPTIONSTREAM_PORT=str(port))
    up = subprocess.Popen(
        [sys.executable, "-m", "captionstream", "up", "--broker-port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        gateway = Gateway(f"http://127.0.0.1:{port}")
        wait_until(gateway.healthy, 60, "the gateway of `captionstream up`")
        spawned = descendants(up.pid)
        up.send_signal(signal.SIGTERM)  # only the supervisor gets it
        assert up.wait(30) == 0
        wait_until(lambda: not any(running(p) for p in spawned), 10, "children to exit")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_worker_fails_fast_naming_the_setting_when_model_is_unavailable(tmp_path: Path) -> None:
    env = clean_env(tmp_path, CAPTIONSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}")
    result = subprocess.run(
        [sys.executable, "-m", "captionstream", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "CAPTIONSTREAM_MODEL" in result.stderr
    assert "Salesforce/blip-image-captioning-base" in result.stderr


def test_broker_command_starts_nothing_when_an_external_kafka_is_configured(
    tmp_path: Path,
) -> None:
    env = clean_env(tmp_path, CAPTIONSTREAM_KAFKA_BOOTSTRAP="kafka.example:9092")
    result = subprocess.run(
        [sys.executable, "-m", "captionstream", "broker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "starting nothing" in result.stderr
