"""What the worker's timers and pages compute (processor.observability), with a fake
consumer and a real metrics registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from captionstream.processor.observability import ProcessorMetrics, readiness, record_consumer_lag


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


class FakeConsumer:
    def __init__(self, positions: dict[TP, int | None], highwaters: dict[TP, int | None]) -> None:
        self.positions = positions
        self.highwaters = highwaters

    def assignment(self) -> set[TP]:
        return set(self.positions)

    async def position(self, tp: TP) -> int | None:
        return self.positions[tp]

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def lag_of(metrics: ProcessorMetrics, partition: int) -> float | None:
    return metrics.registry.get_sample_value(
        "captionstream_processor_consumer_lag", {"partition": str(partition)}
    )


async def test_lag_is_measured_on_the_images_topic_where_a_highwater_is_known() -> None:
    images = [TP("images", 0), TP("images", 1), TP("images", 2), TP("images", 3)]
    other = TP("jobs-changelog", 7)
    consumer = FakeConsumer(
        positions={images[0]: 10, images[1]: 5, images[2]: 3, images[3]: None, other: 0},
        highwaters={images[0]: 25, images[1]: 4, images[2]: None, images[3]: 9, other: 99},
    )
    metrics = ProcessorMetrics()

    await record_consumer_lag(consumer, "images", metrics.consumer_lag)

    assert lag_of(metrics, 0) == 15
    assert lag_of(metrics, 1) == 0, "never negative (a position past a stale highwater)"
    assert lag_of(metrics, 2) is None, "no highwater before the first fetch: no figure"
    assert lag_of(metrics, 3) is None
    assert lag_of(metrics, 7) is None, "other topics are not the backlog"


@pytest.mark.parametrize(
    ("started", "rebalancing", "recovering", "status"),
    [
        (True, False, False, 200),
        (False, False, False, 503),
        (True, True, False, 503),
        (True, False, True, 503),
    ],
)
def test_readiness(started: bool, rebalancing: bool, recovering: bool, status: int) -> None:
    code, body = readiness("blip", started=started, rebalancing=rebalancing, recovering=recovering)
    assert code == status
    assert body["checks"] == {
        "model": "blip",
        "started": started,
        "rebalancing": rebalancing,
        "recovering": recovering,
    }
    assert (body.get("status") == "ready") is (status == 200)


def test_the_metrics_page_names_no_charset_for_aiohttp() -> None:
    body, content_type = ProcessorMetrics().page()
    assert b"captionstream_processor_batch_size" in body
    assert content_type.startswith("text/plain")
    assert "charset" not in content_type
    assert not content_type.endswith(";")


async def test_timed_batches_observe_size_and_time_and_pass_results_through() -> None:
    metrics = ProcessorMetrics()

    async def double(batch: list[int]) -> list[int]:
        return [2 * x for x in batch]

    run = metrics.timed_batches(double)
    assert await run([1, 2, 3]) == [2, 4, 6]
    assert await run([4]) == [8]

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert sample("captionstream_processor_batch_size_count") == 2
    assert sample("captionstream_processor_batch_size_sum") == 4
    assert sample("captionstream_processor_inference_seconds_count") == 2
