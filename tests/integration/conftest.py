from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from captionstream.broker import EmbeddedBroker, free_port
from tests.integration.stack import Component, Stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(port=free_port(), log_file=log) as running:
        yield running


@pytest.fixture(scope="session")
def stack(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("stack")
    (root / "logs").mkdir()
    running = Stack(bootstrap=broker.bootstrap, data_dir=root / "data", log_dir=root / "logs")
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="session")
def worker(stack: Stack) -> Component:
    """One processor worker shared by the session (tests use distinct jobs)."""
    return stack.start_worker()


# A real Apache Kafka (JVMs from Maven Central jars, captionstream.apache_kafka): the
# session fixtures `apache_kafka` (1 node) and `apache_kafka_cluster` (3 nodes) live in
# tests/integration/apache.py; importing them here is what lets pytest find them.
from tests.integration.apache import apache_kafka, apache_kafka_cluster  # noqa: E402, F401
