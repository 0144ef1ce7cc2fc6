"""Gateway metrics: the view gauge, the end-to-end histogram and the HTTP middleware,
through prometheus-client's own registry and a real ASGI app (no broker needed)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import httpx
from fastapi import APIRouter, FastAPI, HTTPException
from prometheus_client.parser import text_string_to_metric_families

from captionstream.gateway.metrics import UNMATCHED_ROUTE, GatewayMetrics, HttpMetricsMiddleware
from captionstream.gateway.view import JobView
from captionstream.schemas.events import JobState, JobStatus, utcnow


def pending(job_id: str, age_s: float = 0.0) -> JobState:
    return JobState.pending(job_id, utcnow() - timedelta(seconds=age_s))


def test_view_gauge_is_computed_from_the_view_at_scrape_time() -> None:
    view = JobView()
    metrics = GatewayMetrics(view)

    def jobs(status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "captionstream_gateway_view_jobs", {"status": status}
        )

    assert [jobs(s.value) for s in JobStatus] == [0, 0, 0, 0, 0]
    a, b = pending("a"), pending("b")
    view.apply(a)
    view.apply(b)
    assert (jobs("PENDING"), jobs("STARTED")) == (2, 0)
    started = a.advance(JobStatus.STARTED)
    view.apply(started)
    done = started.advance(JobStatus.SUCCESS, caption="a cat")
    view.apply(done)
    view.apply(done.advance(JobStatus.STARTED))  # a redelivery: ignored by the view
    assert {s.value: jobs(s.value) for s in JobStatus} == {
        "PENDING": 1,
        "STARTED": 0,
        "RETRY": 0,
        "SUCCESS": 1,
        "FAILURE": 0,
    }


def test_end_to_end_is_observed_once_per_terminal_job() -> None:
    view = JobView()
    metrics = GatewayMetrics(view)
    view.terminal_listeners.append(metrics.observe_terminal)

    def count(status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "captionstream_job_end_to_end_seconds_count", {"status": status}
        )

    job = pending("slow", age_s=42).advance(JobStatus.STARTED)
    view.apply(job)
    assert count("SUCCESS") is None, "nothing observed before a terminal state"
    done = job.advance(JobStatus.SUCCESS, caption="a cat")
    view.apply(done)
    view.apply(done.model_copy(update={"caption": "a dog"}))  # the first result is final
    assert count("SUCCESS") == 1
    seconds = metrics.registry.get_sample_value(
        "captionstream_job_end_to_end_seconds_sum", {"status": "SUCCESS"}
    )
    assert seconds is not None
    assert 42 <= seconds < 52, "measured from submitted_at"
    assert (
        metrics.registry.get_sample_value(
            "captionstream_job_end_to_end_seconds_bucket", {"status": "SUCCESS", "le": "30.0"}
        )
        == 0
    )
    assert (
        metrics.registry.get_sample_value(
            "captionstream_job_end_to_end_seconds_bucket", {"status": "SUCCESS", "le": "60.0"}
        )
        == 1
    )

    failed = pending("bad").advance(JobStatus.FAILURE, error="not an image")
    view.apply(failed)
    assert count("FAILURE") == 1


def test_two_apps_have_independent_registries() -> None:
    first, second = GatewayMetrics(JobView()), GatewayMetrics(JobView())
    first.jobs_submitted.labels("upload").inc()
    assert (
        first.registry.get_sample_value(
            "captionstream_gateway_jobs_submitted_total", {"source": "upload"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "captionstream_gateway_jobs_submitted_total", {"source": "upload"}
        )
        is None
    )


async def test_middleware_counts_by_route_template_method_and_status() -> None:
    app = FastAPI()
    app.add_middleware(HttpMetricsMiddleware)
    metrics = GatewayMetrics(JobView())
    app.state.gateway = SimpleNamespace(metrics=metrics)  # as GatewayState holds them

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        if item_id == "missing":
            raise HTTPException(404, "no such item")
        if item_id == "boom":
            raise RuntimeError("a bug")
        return {"id": item_id}

    router = APIRouter(prefix="/v9")

    @router.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    app.include_router(router)

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for item_id in ("1", "2", "3"):
            assert (await client.get(f"/items/{item_id}")).status_code == 200
        assert (await client.get("/items/missing")).status_code == 404
        assert (await client.get("/items/boom")).status_code == 500
        assert (await client.post("/items/1")).status_code == 405
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.get("/another/unknown")).status_code == 404
        assert (await client.get("/v9/things/7")).status_code == 200

    def requests(route: str, method: str, status: int) -> float | None:
        return metrics.registry.get_sample_value(
            "captionstream_gateway_http_requests_total",
            {"route": route, "method": method, "status": str(status)},
        )

    assert requests("/items/{item_id}", "GET", 200) == 3
    assert requests("/items/{item_id}", "GET", 404) == 1
    assert requests("/items/{item_id}", "GET", 500) == 1
    assert requests("/items/{item_id}", "POST", 405) == 1
    assert requests(UNMATCHED_ROUTE, "GET", 404) == 2
    assert requests("/v9/things/{thing_id}", "GET", 200) == 1, "router prefix included"
    assert (
        metrics.registry.get_sample_value(
            "captionstream_gateway_http_request_duration_seconds_count",
            {"route": "/items/{item_id}", "method": "GET"},
        )
        == 5
    )

    # The exposition is valid Prometheus text that a scraper can parse.
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {
        "captionstream_gateway_http_requests",
        "captionstream_gateway_http_request_duration_seconds",
        "captionstream_gateway_jobs_submitted",
        "captionstream_gateway_websocket_connections",
        "captionstream_gateway_view_jobs",
        "captionstream_job_end_to_end_seconds",
    } <= names
