"""`python -m bench.polling` (the second half of `make bench`): the stack under clients
that poll, as the reference service's clients do.

Each client uploads an image, then asks for its status until it is SUCCESS or FAILURE,
then uploads the next. Two loads, each on a stack of broker, worker and gateway
processes with the worker's default settings (what `make run` runs), beside the
alternatives the defaults were chosen against (processor/threads.py):

1. the tiny model, 20 clients asking every 20 ms: the gateway's request handling
   competes with the worker for the cores;
2. the full-size BLIP-base architecture (random weights, 20 tokens), 8 clients, against
   the best bare batched figure measured in the same run: clients that ask as
   `Retry-After` says, and clients that ask every 20 ms.

The clients run in this process, on the same cores: their CPU counts against the
machine, as it would for clients on a laptop running `make run`. Writes
bench/RESULTS-polling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
from PIL import Image

from bench import bare
from bench.console import progress, publish_report
from bench.images import decode, synthetic_jpegs
from bench.model import NEW_TOKENS, build_bench_blip
from bench.pipeline import running_stack
from bench.stats import BarePoint, PollingRun, best_point, polling_table
from bench.system import CpuMeter, machine_description

ROOT = Path(__file__).resolve().parent
TERMINAL = ("SUCCESS", "FAILURE")


def tiny_pngs(count: int, salt: int) -> list[bytes]:
    """Distinct small PNGs (distinct content: the caption cache never answers them)."""
    images = []
    for i in range(count):
        buf = io.BytesIO()
        color = (i % 256, (i // 256) % 256, salt % 256)
        Image.new("RGB", (64, 48), color).save(buf, "PNG")
        images.append(buf.getvalue())
    return images


async def polling_clients(
    url: str, images: Sequence[bytes], clients: int, every_s: float | None
) -> tuple[float, list[float], int]:
    """`clients` clients share `images`; each asks for its job's status every `every_s`
    seconds, or as the answer's `Retry-After` says (None). Returns (wall seconds,
    per-job latencies, requests made)."""
    todo = iter(images)
    latencies: list[float] = []
    requests = 0
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client() -> None:
            nonlocal requests
            for data in todo:
                sent = time.monotonic()
                upload = await http.post("/api/v1/upload", files={"file": ("i", data)})
                requests += 1
                if upload.status_code != 202:
                    raise RuntimeError(f"upload answered {upload.status_code}: {upload.text}")
                job_id = upload.json()["job_id"]
                while True:
                    status = await http.get(f"/api/v1/status/{job_id}")
                    requests += 1
                    if status.json()["status"] in TERMINAL:
                        break
                    wait = every_s
                    if wait is None:
                        wait = float(status.headers.get("retry-after", "1"))
                    await asyncio.sleep(wait)
                latencies.append(time.monotonic() - sent)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.monotonic() - started, latencies, requests


def measure(
    label: str,
    *,
    model_dir: Path,
    model_name: str,
    cache_dir: Path,
    warmup: Sequence[bytes],
    timed: Sequence[bytes],
    clients: int,
    every_s: float | None,
    worker_env: Mapping[str, str],
    new_tokens: int,
) -> PollingRun:
    mode = "as Retry-After says" if every_s is None else f"every {every_s * 1000:.0f} ms"
    progress(f"{model_name}, {label}: {clients} clients asking {mode}, {len(timed)} jobs")
    with running_stack(
        model_dir=model_dir,
        cache_dir=cache_dir,
        precision="auto",
        device="auto",
        max_batch_size=8,  # the worker's defaults, as under `make run`
        max_batch_wait_s=0.05,
        new_tokens=new_tokens,
        keep=False,
        progress=progress,
        worker_env=worker_env,
    ) as stack:
        asyncio.run(polling_clients(stack.gateway_url, warmup, clients, every_s))
        meter = CpuMeter(stack.pids)
        meter.start()
        wall, latencies, requests = asyncio.run(
            polling_clients(stack.gateway_url, timed, clients, every_s)
        )
        meter.stop()
        cores = tuple(
            (role, used)
            for role, pid in stack.components().items()
            if (used := meter.cores_of(pid)) is not None
        )
    run = PollingRun(
        label=label,
        model=model_name,
        clients=clients,
        client_mode=mode,
        jobs=len(timed),
        wall_s=wall,
        latencies_s=tuple(latencies),
        requests=requests,
        worker_env=tuple(sorted(worker_env.items())),
        cores=cores,
    )
    progress(f"  {run.jobs_per_s:.2f} jobs/s")
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    p.add_argument("--tiny-jobs", type=int, default=None, help="tiny-model jobs (400)")
    p.add_argument("--full-jobs", type=int, default=None, help="full-size model jobs (48)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--output", default=str(ROOT / "RESULTS-polling.md"), help="'-': nowhere")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tiny_jobs = args.tiny_jobs or (40 if args.quick else 400)
    full_jobs = args.full_jobs or (8 if args.quick else 48)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    cores = str(len(os.sched_getaffinity(0)))
    default: dict[str, str] = {}
    all_cores = {"CAPTIONSTREAM_TORCH_THREADS": cores}
    passive = {"CAPTIONSTREAM_TORCH_THREADS": cores, "OMP_WAIT_POLICY": "PASSIVE"}

    tiny_runs = []
    set_ups = [
        ("default", default),
        ("every core", all_cores),
        ("every core, passive waits", passive),
    ]
    for i, (label, env) in enumerate(set_ups):
        tiny_runs.append(
            measure(
                label,
                model_dir=Path("tiny-blip"),
                model_name="tiny-blip",
                cache_dir=args.cache_dir,
                warmup=tiny_pngs(40, salt=2 * i),
                timed=tiny_pngs(tiny_jobs, salt=2 * i + 1),
                clients=20,
                every_s=0.02,
                worker_env=env,
                new_tokens=30,
            )
        )

    model_dir = build_bench_blip(args.cache_dir / "blip-base-random")
    jpegs = synthetic_jpegs(full_jobs + 8)
    points = bare.measure(
        model_dir,
        precision="fp32",
        device="auto",
        batch_sizes=[8, 16],
        batches=1 if args.quick else 2,
        warmup_batches=1,
        images=[decode(j) for j in jpegs[:16]],
        new_tokens=NEW_TOKENS,
        progress=progress,
    )
    best: BarePoint = best_point(points)
    full_runs = [
        measure(
            label,
            model_dir=model_dir,
            model_name="BLIP-base (random)",
            cache_dir=args.cache_dir,
            warmup=jpegs[:8],
            timed=jpegs[8:],
            clients=8,
            every_s=every_s,
            worker_env=env,
            new_tokens=NEW_TOKENS,
        )
        for label, env, every_s in [
            ("default", default, None),
            ("every core, passive waits", passive, None),
            ("default", default, 0.02),
        ]
    ]
    report = "\n".join(
        [
            "# Polling clients",
            "",
            *(f"- **{key}**: {value}" for key, value in machine_description("auto").items()),
            "",
            "Clients upload, then ask for the status until the job is finished; they run "
            "on the same cores as the stack. `python -m bench.polling` (`make bench`).",
            "",
            "## Tiny model, 20 clients asking every 20 ms",
            "",
            *polling_table(tiny_runs),
            "",
            "## Full-size BLIP-base, 8 clients, against the best bare batched figure",
            "",
            f"Bare: {', '.join(f'b{p.batch_size} {p.images_per_s:.3f}' for p in points)} "
            f"images/s (fp32, in-process, measured in this run).",
            "",
            *polling_table(full_runs, best),
            "",
        ]
    )
    publish_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
