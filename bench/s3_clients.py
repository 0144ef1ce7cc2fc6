"""`python -m bench.s3_clients`: S3 client libraries compared for the blob store.

The candidates for `ingest.s3_blobstore` (boto3, aiobotocore, obstore), each timed in
the two ways the pipeline uses a blob store, against one local moto server
(`python -m moto.server`, a process of its own):

1. sync: put then get of a ~200 KB image, one after the other, from one thread (the
   worker's inference thread reads images this way);
2. async: the same round trips from the event loop, 8 in flight (the gateway stores
   uploads this way); boto3 runs them in threads (`asyncio.to_thread`).

Reported per candidate: milliseconds per round trip, round trips per second, this
process's CPU per round trip (client overhead; moto's own CPU is not in it), the cost of
importing it and making the first client (in a fresh interpreter), and the installed size
of what it adds beyond the project's other dependencies. Ratios are against boto3.

A candidate that is not installed is reported as such: `obstore` and `aiobotocore` are no
project dependencies (aiobotocore pins botocore to a few patch releases, so it usually
needs a virtualenv of its own). Writes bench/RESULTS-s3.md unless `--output -`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.console import progress, publish_report
from bench.harness import MOTO_KEY, MOTO_REGION, s3_server
from bench.system import CpuMeter, cpu_model_from_cpuinfo

ROOT = Path(__file__).resolve().parent
BUCKET = "bench"
REGION = MOTO_REGION
CREDENTIALS = {"aws_access_key_id": MOTO_KEY, "aws_secret_access_key": MOTO_KEY}
IMAGE_BYTES = 200_000
CONCURRENCY = 8
# What each candidate adds to an install beyond the project's own dependencies (aiohttp,
# urllib3 and python-dateutil are there already, through Faust and others).
ADDED_DISTRIBUTIONS = {
    "boto3": ("boto3", "botocore", "s3transfer", "jmespath"),
    "aiobotocore": ("aiobotocore", "botocore", "aioitertools", "wrapt", "jmespath"),
    "obstore": ("obstore",),
}


@dataclass
class Client:
    """One candidate's put/get, sync where it has a sync API, async always."""

    put: Callable[[str, bytes], Awaitable[None]]
    get: Callable[[str], Awaitable[bytes]]
    put_sync: Callable[[str, bytes], None] | None
    get_sync: Callable[[str], bytes] | None
    close: Callable[[], Awaitable[None]]


@dataclass
class Result:
    name: str
    version: str
    sync_ms: float | None = None
    sync_cpu_ms: float | None = None
    async_per_s: float = 0.0
    async_cpu_ms: float = 0.0
    startup_ms: float = 0.0
    added_mb: float = 0.0
    other_cores: float | None = None


async def boto3_client(endpoint: str) -> Client:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        config=Config(max_pool_connections=CONCURRENCY),
        **CREDENTIALS,
    )

    def put_sync(key: str, data: bytes) -> None:
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    def get_sync(key: str) -> bytes:
        body: bytes = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return body

    async def put(key: str, data: bytes) -> None:
        await asyncio.to_thread(put_sync, key, data)

    async def get(key: str) -> bytes:
        return await asyncio.to_thread(get_sync, key)

    async def close() -> None:
        s3.close()

    return Client(put, get, put_sync, get_sync, close)


async def aiobotocore_client(endpoint: str) -> Client:
    session = importlib.import_module("aiobotocore.session").get_session()
    config = importlib.import_module("aiobotocore.config").AioConfig(
        max_pool_connections=CONCURRENCY
    )
    context = session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, config=config, **CREDENTIALS
    )
    s3 = await context.__aenter__()

    async def put(key: str, data: bytes) -> None:
        await s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def get(key: str) -> bytes:
        response = await s3.get_object(Bucket=BUCKET, Key=key)
        async with response["Body"] as stream:
            body: bytes = await stream.read()
        return body

    async def close() -> None:
        await context.__aexit__(None, None, None)

    return Client(put, get, None, None, close)


async def obstore_client(endpoint: str) -> Client:
    obs: Any = importlib.import_module("obstore")
    store = importlib.import_module("obstore.store").S3Store(
        BUCKET,
        endpoint=endpoint,
        region=REGION,
        access_key_id=CREDENTIALS["aws_access_key_id"],
        secret_access_key=CREDENTIALS["aws_secret_access_key"],
        client_options={"allow_http": True},
    )

    def put_sync(key: str, data: bytes) -> None:
        obs.put(store, key, data)

    def get_sync(key: str) -> bytes:
        return bytes(obs.get(store, key).bytes())

    async def put(key: str, data: bytes) -> None:
        await obs.put_async(store, key, data)

    async def get(key: str) -> bytes:
        result = await obs.get_async(store, key)
        return bytes(await result.bytes_async())

    async def close() -> None:
        pass

    return Client(put, get, put_sync, get_sync, close)


CANDIDATES: dict[str, Callable[[str], Awaitable[Client]]] = {
    "boto3": boto3_client,
    "aiobotocore": aiobotocore_client,
    "obstore": obstore_client,
}
# What a fresh interpreter does before its first request (the import and client cost).
STARTUP_CODE = {
    "boto3": "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:1', "
    "region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')",
    "aiobotocore": "import asyncio, aiobotocore.session as s\n"
    "async def main():\n"
    "    async with s.get_session().create_client('s3', endpoint_url='http://127.0.0.1:1', "
    "region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x'):\n"
    "        pass\n"
    "asyncio.run(main())",
    "obstore": "from obstore.store import S3Store; S3Store('b', endpoint='http://127.0.0.1:1', "
    "region='us-east-1', access_key_id='x', secret_access_key='x')",
}


def installed_mb(distributions: tuple[str, ...]) -> float:
    total = 0
    for name in distributions:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                total += path.stat().st_size
    return total / 1e6


def startup_ms(name: str, repeats: int = 5) -> float:
    """Median wall time of a fresh interpreter that imports and builds a client, less that
    of a bare interpreter."""

    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start

    bare = statistics.median(run("pass") for _ in range(repeats))
    return 1000 * (statistics.median(run(STARTUP_CODE[name]) for _ in range(repeats)) - bare)


async def measure(name: str, endpoint: str, server_pid: int, rounds: int, image: bytes) -> Result:
    client = await CANDIDATES[name](endpoint)
    result = Result(name, importlib.metadata.version(name))
    meter = CpuMeter([server_pid])  # "other load": neither this process nor moto
    meter.start()
    try:
        for i in range(5):  # warm up: connections, credential resolution
            await client.put(f"{name}/warm-{i}", image)
            assert await client.get(f"{name}/warm-{i}") == image
        if client.put_sync is not None and client.get_sync is not None:
            cpu, start = time.process_time(), time.perf_counter()
            for i in range(rounds):
                client.put_sync(f"{name}/sync-{i}", image)
                assert client.get_sync(f"{name}/sync-{i}") == image
            result.sync_ms = 1000 * (time.perf_counter() - start) / rounds
            result.sync_cpu_ms = 1000 * (time.process_time() - cpu) / rounds
        slots = asyncio.Semaphore(CONCURRENCY)

        async def round_trip(i: int) -> None:
            async with slots:
                await client.put(f"{name}/async-{i}", image)
                assert await client.get(f"{name}/async-{i}") == image

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(round_trip(i) for i in range(rounds)))
        result.async_per_s = rounds / (time.perf_counter() - start)
        result.async_cpu_ms = 1000 * (time.process_time() - cpu) / rounds
    finally:
        await client.close()
        result.other_cores = meter.stop()
    return result


def available(name: str) -> str | None:
    """None when `name` imports here, else why not."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return f"not installed here ({exc.msg})"
    return None


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def report(results: list[Result], missing: dict[str, str], rounds: int) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    base = next((r for r in results if r.name == "boto3"), results[0])
    lines = [
        "# S3 clients for the blob store",
        "",
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- **CPU**: {cpu_model_from_cpuinfo(cpuinfo)}, {os.cpu_count()} logical cores, no GPU",
        f"- **software**: Python {platform.python_version()}, moto "
        f"{importlib.metadata.version('moto')} (`python -m moto.server`, same machine)",
        f"- **load**: {rounds} round trips (put + get) of a {IMAGE_BYTES // 1000} KB image "
        f"per mode; async: {CONCURRENCY} in flight",
        "",
        "`python -m bench.s3_clients`. Times include moto's own work, which shares the two "
        "cores with the client: client CPU per round trip is the client's cost alone. Other "
        "load: cores busy with processes other than this one and moto meanwhile.",
        "",
        "| client | version | sync ms/round trip | async round trips/s | client CPU ms/rt "
        "(sync, async) | import + first client ms | adds installed MB | other load (cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sync = (
            "no sync API"
            if r.sync_ms is None
            else f"{r.sync_ms:.1f} ({ratio(r.sync_ms, base.sync_ms)})"
        )
        sync_cpu = "-" if r.sync_cpu_ms is None else f"{r.sync_cpu_ms:.1f}"
        other = "?" if r.other_cores is None else f"{r.other_cores:.2f}"
        lines.append(
            f"| {r.name} | {r.version} | {sync} "
            f"| {r.async_per_s:.1f} ({ratio(r.async_per_s, base.async_per_s)}) "
            f"| {sync_cpu}, {r.async_cpu_ms:.1f} ({ratio(r.async_cpu_ms, base.async_cpu_ms)}) "
            f"| {r.startup_ms:.0f} | {r.added_mb:.1f} | {other} |"
        )
    for name, why in missing.items():
        lines.append(f"| {name} | {why} | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_clients", description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="round trips per mode")
    parser.add_argument("--output", default=str(ROOT / "RESULTS-s3.md"), help="`-`: print only")
    args = parser.parse_args(argv)
    image = os.urandom(IMAGE_BYTES)  # incompressible, like JPEG data
    missing = {name: why for name in CANDIDATES if (why := available(name)) is not None}
    results = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        s3_server(Path(tmp) / "moto.log", bucket=BUCKET) as moto,
    ):
        for name in CANDIDATES:
            if name in missing:
                progress(f"{name}: {missing[name]}")
                continue
            progress(f"{name}: {args.rounds} round trips each way")
            result = asyncio.run(measure(name, moto.endpoint, moto.pid, args.rounds, image))
            result.startup_ms = startup_ms(name)
            result.added_mb = installed_mb(ADDED_DISTRIBUTIONS[name])
            results.append(result)
    if not results:
        progress("no candidate is installed")
        return 1
    publish_report(report(results, missing, args.rounds), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
