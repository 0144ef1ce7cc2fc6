"""A batch that runs longer than the consumer session timeout must not cost the worker
its partitions: inference runs in a thread, so heartbeats keep flowing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers.images import make_png
from tests.integration.stack import Stack, own_stack

pytestmark = pytest.mark.brokers("embedded", "apache")

# Every batch takes at least this long: longer than the consumer session.
SESSION_TIMEOUT_S = 4.0
SECONDS_PER_IMAGE = 5.0


@pytest.fixture
def slow_stack(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("slow"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
        CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE=str(SECONDS_PER_IMAGE),
        CAPTIONSTREAM_MAX_BATCH_SIZE="4",
        CAPTIONSTREAM_KAFKA_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
        CAPTIONSTREAM_KAFKA_HEARTBEAT_INTERVAL_S="1",
    ) as stack:
        yield stack


def test_batch_longer_than_session_timeout_keeps_partitions(slow_stack: Stack) -> None:
    worker = slow_stack.start_worker()
    gateway = slow_stack.start_gateway()
    assignments_before = worker.log().count("Setting newly assigned partitions")

    started = time.monotonic()
    job_ids = [gateway.upload(make_png(color=(i, 1, 2))).json()["job_id"] for i in range(2)]
    finals = [gateway.wait_terminal(job_id, timeout_s=60) for job_id in job_ids]
    elapsed = time.monotonic() - started

    assert [f["status"] for f in finals] == ["SUCCESS"] * 2
    assert [f["attempts"] for f in finals] == [1] * 2, "nothing was redelivered"
    assert SESSION_TIMEOUT_S < SECONDS_PER_IMAGE
    assert elapsed >= SECONDS_PER_IMAGE
    log = worker.log()
    assert log.count("Setting newly assigned partitions") == assignments_before, (
        "no rebalance happened during the long batch"
    )
    assert "Heartbeat failed" not in log
