"""docker-compose.kafka.yml, checked against the code it deploys (no Docker engine here:
this is the check). Settings the services set must exist, Kafka must be the version the
project pins, the topics step must be the project's own `captionstream topics --create`
with the workers' settings (so it creates exactly the plan the code declares), and
workers must scale.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs in the dev dependencies
from pydantic_settings import BaseSettings

from captionstream.apache_kafka import KAFKA_VERSION, POM_PATH
from captionstream.cli import build_parser, cmd_topics
from captionstream.kafka.topics import (
    PROCESSOR_TABLES,
    changelog_topic,
    leader_topic,
    topic_plan,
)
from captionstream.settings import GatewaySettings, KafkaProfile, ProcessorSettings
from schemas.topics import TOPICS

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.kafka.yml"
KAFKA_IMAGE = "apache/kafka"

# `captionstream <command>` -> the settings classes that command reads (the first one for
# what it does; `topics` reads the gateway's only for the ACLs it prints).
SETTINGS_OF_COMMAND: dict[str, tuple[type[BaseSettings], ...]] = {
    "gateway": (GatewaySettings,),
    "worker": (ProcessorSettings,),
    "topics": (ProcessorSettings, GatewaySettings),
}
# Commands that run once and exit (the others are long-running services).
ONE_SHOT_COMMANDS = {"topics"}

_VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`
    (with nothing set in the environment unless `env` says so)."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        if match["bare"]:
            return env.get(match["bare"], "")
        expression = match["braced"]
        for separator, empty_counts in ((":-", True), ("-", False)):
            name, found, default = expression.partition(separator)
            if found:
                value = env.get(name)
                return default if value is None or (empty_counts and not value) else value
        if not re.fullmatch(r"[A-Za-z_]\w*", expression):
            raise ValueError(f"unsupported interpolation ${{{expression}}}")
        return env.get(expression, "")

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, interpolated (dict or `KEY=value` list form)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: interpolate(str(value)) for key, value in raw.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def project_services(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services running the project's image (built from the Dockerfile)."""
    return {
        name: service
        for name, service in services.items()
        if "build" in service or str(service.get("image", "")).startswith("captionstream:")
    }


def long_running(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Project services that keep running (gateway and workers, not the topics step)."""
    return {
        name: service
        for name, service in project_services(services).items()
        if command_of(service)[:1] and command_of(service)[0] not in ONE_SHOT_COMMANDS
    }


def workers(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in project_services(services).items()
        if command_of(service)[:1] == ["worker"]
    }


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = str(settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{field}".upper() for field in settings.model_fields}


def settings_of(service: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch, index: int = 0) -> Any:
    """The settings the service's command reads, from the service's environment only."""
    for key in list(os.environ):
        if key.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(key)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    return SETTINGS_OF_COMMAND[command_of(service)[0]][index]()


def pinned_kafka_version() -> str:
    """`kafka.version` of the POM the project's own Kafka launcher gathers its jars with."""
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    found = ElementTree.parse(POM_PATH).getroot().find("m:properties/m:kafka.version", namespace)
    assert found is not None, f"no kafka.version in {POM_PATH}"
    assert found.text, f"empty kafka.version in {POM_PATH}"
    return found.text.strip()


def kafka_brokers(services: Mapping[str, dict[str, Any]]) -> list[str]:
    return [
        name
        for name, service in services.items()
        if str(service.get("image", "")).startswith(f"{KAFKA_IMAGE}:")
        and "broker" in environment(service).get("KAFKA_PROCESS_ROLES", "").split(",")
    ]


# --- settings ---------------------------------------------------------------------------


def test_every_project_service_runs_a_known_command(
    services: dict[str, dict[str, Any]],
) -> None:
    found = {name: command_of(s)[:1] for name, s in project_services(services).items()}
    assert {"gateway", "processor", "processor-gpu", "topics"} <= set(found)
    for name, command in found.items():
        assert command, f"{name} runs no command"
        assert command[0] in SETTINGS_OF_COMMAND, f"{name} runs {command}"


def test_every_captionstream_variable_is_a_setting_of_its_service(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in project_services(services).items():
        classes = SETTINGS_OF_COMMAND[command_of(service)[0]]
        variables = {key for key in environment(service) if key.startswith("CAPTIONSTREAM_")}
        unknown = variables - set().union(*(env_names(settings) for settings in classes))
        assert not unknown, f"{name} sets {sorted(unknown)}, not fields of " + ", ".join(
            settings.__name__ for settings in classes
        )


def test_only_project_services_set_captionstream_variables(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name not in project_services(services):
            assert not [key for key in environment(service) if key.startswith("CAPTIONSTREAM_")]


@pytest.mark.parametrize("name", ["gateway", "processor", "processor-gpu", "topics"])
def test_each_services_environment_parses_into_its_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for index in range(len(SETTINGS_OF_COMMAND[command_of(services[name])[0]])):
        settings = settings_of(services[name], monkeypatch, index)
        assert settings.model_dump()["kafka_bootstrap"] == "kafka:9092"
        assert settings.model_dump()["profile"] is KafkaProfile.KAFKA
        assert str(settings.model_dump()["data_dir"]) == "/data"


# --- topics -----------------------------------------------------------------------------


def test_topics_step_is_captionstream_topics_create(
    services: dict[str, dict[str, Any]],
) -> None:
    """The project's own command (parsed by the real CLI parser), from the project's
    image: the plan it creates is the code's, never a hand-written copy."""
    step = services["topics"]
    assert "topics" in project_services(services)
    command = command_of(step)
    assert command == ["topics", "--create"]
    args = build_parser().parse_args(command)
    assert args.func is cmd_topics
    assert args.create is True
    assert "entrypoint" not in step  # the image's entry point: `captionstream`
    assert step.get("restart") == "no"  # runs once; restarted, it would never complete


def test_no_service_creates_topics_by_hand(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        script = " ".join([*command_of(service), str(service.get("entrypoint", ""))])
        assert "kafka-topics" not in script, name


def test_topics_step_creates_the_plan_the_services_use(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's plan holds the project's topics and Faust's (the processor's table
    changelogs and assignor leader topic), with the partition count and processor group
    every worker runs with, so workers find every topic they use as they use it."""
    step = settings_of(services["topics"], monkeypatch)
    plan = topic_plan(step.partitions, step.group_id)
    names = [topic.name for topic in plan]
    assert len(names) == len(set(names))
    faust = {changelog_topic(step.group_id, table) for table in PROCESSOR_TABLES}
    faust.add(leader_topic(step.group_id))
    assert set(names) == {spec.name for spec in TOPICS.all()} | faust
    for name, service in workers(services).items():
        worker = settings_of(service, monkeypatch)
        assert topic_plan(worker.partitions, worker.group_id) == plan, name
    gateway = settings_of(services["gateway"], monkeypatch)
    assert gateway.partitions == step.partitions


def test_partition_counts_match_the_services_setting(
    services: dict[str, dict[str, Any]],
) -> None:
    """The processor's table changelogs are created with CAPTIONSTREAM_PARTITIONS and
    must be co-partitioned with the images topic; every service checks the existing
    topics against it, and the gateway would create a missing topic with it."""
    settings = {
        environment(s).get("CAPTIONSTREAM_PARTITIONS") for s in project_services(services).values()
    }
    assert len(settings) == 1
    (partitions,) = settings
    assert partitions is not None
    assert int(partitions) >= 1


def test_replication_factor_is_explicit_and_fits_the_brokers(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, topics would get whatever the broker defaults to; the demo's single broker
    holds one replica, so every service sets that explicitly."""
    brokers = kafka_brokers(services)
    assert brokers == ["kafka"]
    for name, service in project_services(services).items():
        assert "CAPTIONSTREAM_REPLICATION_FACTOR" in environment(service), name
        settings = settings_of(service, monkeypatch)
        assert settings.replication_factor is not None, name
        assert 1 <= settings.replication_factor <= len(brokers), name


def test_topics_are_never_auto_created(services: dict[str, dict[str, Any]]) -> None:
    assert environment(services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


# --- start order, health, Kafka -----------------------------------------------------------


def test_topics_run_once_kafka_is_healthy_and_before_the_services(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "healthcheck" in services["kafka"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert {"gateway", "processor", "processor-gpu"} <= set(long_running(services))
    for name in long_running(services):
        depends = services[name]["depends_on"]
        assert depends["topics"]["condition"] == "service_completed_successfully", name
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert "healthcheck" in services[name], name


def test_kafka_runs_in_kraft_mode_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    env = environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert not [key for key in env if "ZOOKEEPER" in key]
    assert not [name for name in services if "zookeeper" in name]
    volume, _, target = services["kafka"]["volumes"][0].partition(":")
    assert target == env["KAFKA_LOG_DIRS"]
    assert volume in compose["volumes"]


def test_kafka_is_the_4x_version_the_project_pins(services: dict[str, dict[str, Any]]) -> None:
    """The same Apache Kafka release as the project's own launcher (the tests' brokers):
    captionstream/apache_kafka.py and the POM it gathers the jars with."""
    images = {
        name: str(service["image"])
        for name, service in services.items()
        if str(service.get("image", "")).startswith(f"{KAFKA_IMAGE}:")
    }
    assert images == {"kafka": images["kafka"]}, "only the broker runs Kafka's image"
    tag = images["kafka"].removeprefix(f"{KAFKA_IMAGE}:")
    assert tag == KAFKA_VERSION == pinned_kafka_version()
    assert re.fullmatch(r"4\.\d+\.\d+", tag), tag


def test_kafka_single_node_kraft_settings(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka"])
    assert env["CLUSTER_ID"]
    listeners = {
        name: address
        for name, _, address in (
            item.partition("://") for item in env["KAFKA_LISTENERS"].split(",")
        )
    }
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) == set(protocols)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    controller_port = listeners[controller].rpartition(":")[2]
    # The node votes for itself, on its controller listener, by the service's name.
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{controller_port}"
    )
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert controller not in advertised
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    # One node: Kafka's internal topics (default replication factor 3) get one replica.
    for setting in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert env[setting] == "1", setting


# --- scaling, GPU, metrics, volumes ---------------------------------------------------------


def fixed_host_ports(service: Mapping[str, Any]) -> list[object]:
    fixed: list[object] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("published"):
                fixed.append(port)
        elif ":" in interpolate(str(port)):
            fixed.append(port)
    return fixed


def test_workers_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    assert {"processor", "processor-gpu"} <= set(workers(services))
    for name, service in workers(services).items():
        assert "container_name" not in service, name
        assert "hostname" not in service, name
        assert fixed_host_ports(service) == [], name


def test_gpu_workers_are_a_profile_with_an_nvidia_device(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "profiles" not in services["processor"]  # CPU workers start by default
    gpu = services["processor-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert environment(gpu)["CAPTIONSTREAM_DEVICE"] == "cuda"


def test_workers_serve_metrics_that_prometheus_scrapes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    processor_sd = jobs["captionstream-processor"]["dns_sd_configs"][0]
    for name, service in workers(services).items():
        env = environment(service)
        port = env["CAPTIONSTREAM_METRICS_PORT"]
        assert env["CAPTIONSTREAM_METRICS_HOST"] == "0.0.0.0", name
        assert f":{port}/readyz" in " ".join(service["healthcheck"]["test"]), name
        assert name in processor_sd["names"]
        assert str(processor_sd["port"]) == port


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """target -> source of a service's `source:target[:mode]` volumes."""
    found: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        found[rest.partition(":")[0]] = source
    return found


def test_model_cache_and_blobs_are_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    for name, service in workers(services).items():
        assert mounts(service)[environment(service)["HF_HOME"]] in declared, name
    for name, service in long_running(services).items():
        blobs = f"{environment(service)['CAPTIONSTREAM_DATA_DIR']}/blobs"
        assert mounts(service)[blobs] == "blobs", name  # one blob store for gateway and workers
    assert "blobs" in declared


# --- the image -------------------------------------------------------------------------------


def test_image_holds_every_package_the_project_installs() -> None:
    """A new top-level package missing from the Dockerfile would install nothing and fail
    only when a container imports it."""
    root = COMPOSE_FILE.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*").rstrip(".")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    dockerfile = (root / "Dockerfile").read_text()
    ignored = (root / ".dockerignore").read_text().split()
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, package
        assert package not in ignored, package
    assert "COPY pyproject.toml README.md ./" in dockerfile


def test_interpolation_helper() -> None:
    assert interpolate("a $$b ${X:-1} ${Y-2} ${Z}") == "a $b 1 2 "
    assert interpolate("${X:-1}/${X-1}", {"X": ""}) == "1/"
    assert interpolate("$X${X}", {"X": "v"}) == "vv"
