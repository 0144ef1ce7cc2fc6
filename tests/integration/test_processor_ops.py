"""The worker's operational pages: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import httpx

from tests.helpers.images import make_png
from tests.integration.stack import Component, Stack, metric_samples, wait_until


def test_worker_health_readiness_and_metrics(stack: Stack, worker: Component) -> None:
    assert worker.url is not None
    assert httpx.get(f"{worker.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(f"{worker.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["model"] == "tiny-blip"

    before = metric_samples(worker.url)
    gateway = stack.start_gateway()
    job_id = gateway.upload(make_png(color=(9, 9, 99))).json()["job_id"]
    assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
    after = metric_samples(worker.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("captionstream_processor_jobs_total", status="SUCCESS") >= 1
    assert delta("captionstream_processor_batch_size_count") >= 1
    assert delta("captionstream_processor_inference_seconds_count") >= 1
    assert delta("captionstream_processor_end_to_end_seconds_count") >= 1

    def lag() -> list[float]:
        return [
            v
            for (name, _), v in metric_samples(worker.url or "").items()
            if name == "captionstream_processor_consumer_lag"
        ]

    wait_until(lambda: len(lag()) > 0, 15, "the lag gauge (measured every 5 s)")
    assert all(v >= 0 for v in lag())
