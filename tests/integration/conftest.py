"""Integration fixtures: real brokers and real processes.

Tests run on the embedded broker (Tansu) unless they are marked
`@pytest.mark.brokers("embedded", "apache")`: then they run once on each, and the test
id names the broker (`test_x[apache]`). Every test that touches Kafka semantics (offsets,
groups, compaction, restarts) is marked so; the summary at the end counts the tests each
broker ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import s3_server
from captionstream.apache_kafka import ApacheKafkaCluster
from captionstream.broker import EmbeddedBroker, free_port
from tests.integration.stack import Component, Stack, own_stack

BROKER_KINDS = ("embedded", "apache")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "brokers(*kinds, soak_on=()): run the test on each broker kind (embedded, apache); "
        "on the kinds in soak_on only in `make soak`",
    )
    config.addinivalue_line(
        "markers", "durable_stack_env(**env): settings for every component of `durable_stack`"
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
            item.user_properties.append(("kafka_broker", _broker_of(item)))
            item.add_marker(pytest.mark.xdist_group(_process_group(item)))


def _process_group(item: pytest.Item) -> str:
    """Which tests must share one pytest-xdist process (`make test` runs two, with
    `--dist loadgroup`): those on a session stack or broker share it, and a module's
    tests share its module fixtures (a stack, the 3-node cluster), per broker kind.
    Groups run side by side; unit tests go wherever there is room."""
    names = getattr(item, "fixturenames", ())
    kind = _broker_kind_param(item) or "embedded"
    if "apache_kafka_cluster" in names:
        return "apache-3-nodes"
    if "stack" in names or "worker" in names:
        return f"session-stack-{kind}"
    if "broker" in names:
        return "session-stack-embedded"
    if "apache_kafka" in names:
        return "session-stack-apache"
    return f"{item.path.stem}-{kind}"


def _broker_kind_param(item: pytest.Item) -> str | None:
    """The broker a `brokers`-marked test was parametrized with, if any."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return str(params["broker_kind"]) if "broker_kind" in params else None


def _broker_of(item: pytest.Item) -> str:
    """Which Kafka a test runs on, for the summary."""
    names = getattr(item, "fixturenames", ())
    kind = _broker_kind_param(item)
    if kind is not None:
        return kind
    if "apache_kafka_cluster" in names:
        return "apache (3 nodes)"
    if "secured_kafka" in names:
        return "apache (SASL_SSL, mTLS)"
    if "apache_kafka" in names:
        return "apache"
    return "embedded"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker is None or "broker_kind" not in metafunc.fixturenames:
        return
    kinds = marker.args or BROKER_KINDS
    soak_on = marker.kwargs.get("soak_on", ())
    unknown = (set(kinds) | set(soak_on)) - set(BROKER_KINDS)
    assert not unknown, f"unknown broker kinds {unknown}"
    params = [
        pytest.param(kind, marks=pytest.mark.soak) if kind in soak_on else kind for kind in kinds
    ]
    metafunc.parametrize("broker_kind", params, indirect=True, scope="session")


@pytest.fixture(scope="session")
def broker_kind(request: pytest.FixtureRequest) -> str:
    """The broker under test: `embedded` unless the test is marked `brokers`."""
    return str(getattr(request, "param", "embedded"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(port=free_port(), log_file=log) as running:
        yield running


@pytest.fixture(scope="session")
def stack(
    broker_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The session's stack on the broker under test (its own data dir per broker). The
    broker starts only when a test needs it."""
    root: Path = tmp_path_factory.mktemp(f"stack-{broker_kind}")
    (root / "logs").mkdir()
    if broker_kind == "apache":
        cluster: ApacheKafkaCluster = request.getfixturevalue("apache_kafka")
        bootstrap = cluster.bootstrap
    else:
        embedded: EmbeddedBroker = request.getfixturevalue("broker")
        bootstrap = embedded.bootstrap
    running = Stack(
        bootstrap=bootstrap,
        data_dir=root / "data",
        log_dir=root / "logs",
        broker_kind=broker_kind,
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="session")
def worker(stack: Stack) -> Component:
    """One processor worker shared by the session (tests use distinct jobs)."""
    return stack.start_worker()


@pytest.fixture
def durable_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack of its own whose embedded broker keeps everything on a local S3 server
    (moto): `stack.broker` can be killed and started again without losing topics, records
    or committed offsets. `@pytest.mark.durable_stack_env(NAME="value")` on a test adds
    settings for its components (a slow captioner, say)."""
    marker = request.node.get_closest_marker("durable_stack_env")
    env: dict[str, str] = {} if marker is None else dict(marker.kwargs)
    root = tmp_path_factory.mktemp(f"durable-{request.path.stem}")
    with s3_server(root / "moto.log") as s3, own_stack(root, s3=s3, **env) as stack:
        yield stack


# A real Apache Kafka (JVMs from Maven Central jars, captionstream.apache_kafka): the
# session fixtures `apache_kafka` (1 node) and `apache_kafka_cluster` (3 nodes) live in
# tests/integration/apache.py; importing them here is what lets pytest find them.
from tests.integration.apache import apache_kafka, apache_kafka_cluster  # noqa: E402, F401
