"""DELETE /api/v1/jobs/{id} cancels a job that has not started: queued at the back of a
backlog that a busy worker is working through, it ends FAILURE without the model
running, while its neighbours succeed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.images import make_png
from tests.integration.stack import Stack, own_stack

pytestmark = pytest.mark.brokers("embedded", "apache")

BACKLOG = 24


@pytest.fixture
def busy_stack(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("cancel"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
        CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.15",
    ) as stack:
        yield stack


def test_cancel_a_queued_job(busy_stack: Stack) -> None:
    busy_stack.start_worker()
    gateway = busy_stack.start_gateway()
    job_ids = [
        gateway.upload(make_png(10 + i, 10, color=(i, 0, 9))).json()["job_id"]
        for i in range(BACKLOG)
    ]
    doomed = job_ids[-1]

    response = httpx.delete(f"{gateway.url}/api/v1/jobs/{doomed}", timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "PENDING"
    assert httpx.delete(f"{gateway.url}/api/v1/jobs/nope", timeout=10).status_code == 404

    cancelled = gateway.wait_terminal(doomed)
    assert cancelled["status"] == "FAILURE"
    assert "cancelled" in str(cancelled["error"])
    assert cancelled["attempts"] == 0, "the model never ran for it"
    for job_id in job_ids[:-1]:
        assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"

    late = httpx.delete(f"{gateway.url}/api/v1/jobs/{job_ids[0]}", timeout=10)
    assert late.status_code == 409
    assert "only a PENDING job" in late.json()["detail"]
