"""The worker's table recovery never lets records reach the agents' queues between
resuming the stream partitions and Faust emptying those queues (processor.transport).

Faust's own order (resume partitions, seek, empty the queues, resume the flow) lost the
records fetched during the seek when the flow was already on: the jobs they carried
stayed PENDING. The end-to-end proof is tests/integration/test_scale_out.py (a worker
SIGKILLed under load, on both brokers); this pins the order on Faust's real recovery
code, so a Faust upgrade that changes it fails here first.
"""

from __future__ import annotations

from typing import Any

import faust
import pytest
from faust.types import TP

from captionstream.processor.transport import FlowSafeRecovery, FlowSafeTableManager

IMAGES = TP("captionstream.images.v1", 0)
CHANGELOG = TP("t-jobs-changelog", 0)


class RecordingConsumer:
    """Stands in for Faust's consumer: records each call and whether the flow was on."""

    def __init__(self) -> None:
        self.flow_active = True  # recovery turned it on to read the changelogs
        self.calls: list[tuple[str, bool]] = []

    def _record(self, name: str) -> None:
        self.calls.append((name, self.flow_active))

    def assignment(self) -> set[TP]:
        return {IMAGES, CHANGELOG}

    def stop_flow(self) -> None:
        self.flow_active = False
        self._record("stop_flow")

    def resume_flow(self) -> None:
        self.flow_active = True
        self._record("resume_flow")

    def resume_partitions(self, tps: Any) -> None:
        self._record("resume_partitions")

    async def perform_seek(self) -> None:
        self._record("perform_seek")


class Fetcher:
    async def maybe_start(self) -> None:
        pass


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> faust.App:
    app = faust.App("t", broker="kafka://127.0.0.1:1", TableManager=FlowSafeTableManager)
    consumer = RecordingConsumer()
    app.consumer = consumer  # type: ignore[assignment]
    monkeypatch.setattr(app, "_fetcher", Fetcher(), raising=False)
    # Emptying the agents' queues is what loses records fetched while the flow is on.
    monkeypatch.setattr(app.flow_control, "resume", lambda: consumer._record("empty_agent_queues"))
    return app


def test_the_worker_app_uses_the_flow_safe_recovery(app: faust.App) -> None:
    assert isinstance(app.tables.recovery, FlowSafeRecovery)


@pytest.mark.parametrize("step", ["on_recovery_completed", "_resume_streams"])
async def test_no_record_flows_between_resuming_partitions_and_emptying_queues(
    app: faust.App, step: str
) -> None:
    recovery = app.tables.recovery
    consumer: RecordingConsumer = app.consumer  # type: ignore[assignment]
    await getattr(recovery, step)(generation_id=app.consumer_generation_id)

    names = [name for name, _ in consumer.calls]
    assert names.index("resume_partitions") < names.index("empty_agent_queues")
    assert names.index("perform_seek") < names.index("empty_agent_queues")
    assert names[-1] == "resume_flow", "the flow comes back on last"
    flowing_before_empty = [
        name for name, active in consumer.calls[: names.index("empty_agent_queues") + 1] if active
    ]
    assert flowing_before_empty == [], f"records could flow during {flowing_before_empty}"
