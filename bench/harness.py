"""Running captionstream's processes, for the integration tests and the benchmark alike: a
component (`python -m captionstream <part>`) with its log file, ready once its /readyz
answers 200, stopped with SIGTERM then SIGKILL; and a local S3 server (moto).

In bench/, not in the captionstream package: `captionstream up` would share only the
spawn and the stop (its children log to its own output and nothing waits for them), and
moto is a development dependency. Tests import it (as they import bench/ already); bench/
imports nothing from tests/.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from captionstream.broker import free_port, port_open, s3_env

TAIL_LINES = 40  # of a component's log, in the error when it dies or is late


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """Ask `predicate` every `interval_s` until it holds (a costly predicate, such as
    hundreds of status requests, asks less often: it shares the cores with the stack)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def answers_ok(url: str) -> bool:
    """Whether a GET of `url` answers 200 within a second."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class ProcessExited(RuntimeError):
    """A component exited while it was awaited."""


@dataclass
class Component:
    """One process with its log file (stdout and stderr)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None  # its HTTP endpoint, when it has one

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1
    ) -> None:
        """Until `predicate` holds; if the process exits first or it is late, the error
        carries the end of the log (a dead process never becomes ready: no point waiting)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if not self.alive():
                raise ProcessExited(
                    f"{self.name} exited with {self.proc.returncode} before {what}; the end "
                    f"of {self.log_path}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: not {what} after {timeout_s:g} s; the end of "
                    f"{self.log_path}:\n{self.tail()}"
                )
            time.sleep(interval_s)

    def wait_ready(self, timeout_s: float, path: str = "/readyz") -> None:
        """Until its `path` answers 200: /readyz (the worker: model loaded, partitions
        assigned and tables recovered; the gateway: Kafka answers and its job view has
        caught up), or /healthz for one that may serve unready."""
        if self.url is None:
            raise ValueError(f"{self.name} serves no HTTP endpoint to ask")
        url = f"{self.url}{path}"
        self.wait_for(lambda: answers_ok(url), timeout_s, f"answering 200 on {path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        """Send `sig` and wait for the exit, SIGKILL after `timeout_s`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def spawn(
    name: str,
    argv: list[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    url: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Component:
    """Start `argv` with its output in `log_path` (`env` None: this process's)."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            preexec_fn=preexec_fn,
        )
    return Component(name, proc, log_path, url)


def spawn_part(
    part: str,
    *args: str,
    env: Mapping[str, str],
    log_path: Path,
    url: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Component:
    """`python -m captionstream <part>`, as production runs it."""
    argv = [sys.executable, "-m", "captionstream", part, *args]
    return spawn(part, argv, env, log_path, url, preexec_fn)


# moto takes any key until told otherwise (`S3Server.enforce_auth`); Tansu insists on one.
MOTO_KEY = "test"
MOTO_REGION = "us-east-1"


@dataclass
class S3Server:
    """A local S3-compatible server (moto) in a process of its own, holding one bucket."""

    bucket: str
    process: Component

    @property
    def endpoint(self) -> str:
        assert self.process.url is not None
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def storage(self) -> str:
        return f"s3://{self.bucket}/"

    def client_options(self) -> dict[str, str]:
        """boto3 client arguments for the server with its default key."""
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": MOTO_KEY,
            "aws_secret_access_key": MOTO_KEY,
            "region_name": MOTO_REGION,
        }

    def tansu_env(self) -> dict[str, str]:
        return s3_env(self.endpoint, MOTO_KEY, MOTO_KEY, MOTO_REGION)

    def enforce_auth(self) -> dict[str, str]:
        """Make moto check every request's signature and rights from now on (it takes any
        key until then); returns the environment of an access key allowed all of S3.
        The default key of `tansu_env` is refused afterwards."""
        import boto3

        iam = boto3.client("iam", **self.client_options())
        iam.create_user(UserName="captionstream")
        allow_s3 = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        iam.put_user_policy(
            UserName="captionstream",
            PolicyName="s3",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_s3]}),
        )
        key = iam.create_access_key(UserName="captionstream")["AccessKey"]
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": MOTO_REGION,
        }


@contextlib.contextmanager
def s3_server(log_path: Path, bucket: str = "tansu") -> Iterator[S3Server]:
    """Start `moto_server` on a free port, create `bucket`; stopped on exit."""
    import boto3  # comes with moto[server] (dev extras)

    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    moto = spawn("moto_server", argv, None, log_path, f"http://127.0.0.1:{port}")
    try:
        moto.wait_for(lambda: port_open("127.0.0.1", port), 30, "listening")
        server = S3Server(bucket, moto)
        boto3.client("s3", **server.client_options()).create_bucket(Bucket=bucket)
        yield server
    finally:
        moto.stop(timeout_s=10)
