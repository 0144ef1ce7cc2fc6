"""docker-compose.kafka.yml, checked against the code it deploys (no Docker engine here:
this is the check). Settings the services set must exist, the topic step must create
exactly the project's topics with their layouts, and workers must scale.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from captionstream.settings import GatewaySettings, KafkaProfile, ProcessorSettings
from schemas.topics import TOPICS

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.kafka.yml"

# `captionstream <command>` -> the settings class that command reads.
SETTINGS_OF_COMMAND: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "worker": ProcessorSettings,
}

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


def workers(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in project_services(services).items()
        if command_of(service)[:1] == ["worker"]
    }


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = str(settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{field}".upper() for field in settings.model_fields}


def topic_commands(services: Mapping[str, dict[str, Any]]) -> dict[str, list[str]]:
    """topic name -> the arguments of the line that creates it, in the topics step."""
    script = "\n".join(command_of(services["topics"])[-1:])
    created: dict[str, list[str]] = {}
    for line in interpolate(script).splitlines():
        words = shlex.split(line)
        if "--topic" in words and ("create" in words or "--create" in words):
            name = words[words.index("--topic") + 1]
            assert name not in created, f"{name} is created twice"
            created[name] = words
    return created


def option_values(words: list[str], option: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]


# --- settings ---------------------------------------------------------------------------


def test_every_project_service_runs_a_known_command(
    services: dict[str, dict[str, Any]],
) -> None:
    found = {name: command_of(s)[:1] for name, s in project_services(services).items()}
    assert {"gateway", "processor", "processor-gpu"} <= set(found)
    for name, command in found.items():
        assert command, f"{name} runs no command"
        assert command[0] in SETTINGS_OF_COMMAND, f"{name} runs {command}"


def test_every_captionstream_variable_is_a_setting_of_its_service(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in project_services(services).items():
        settings = SETTINGS_OF_COMMAND[command_of(service)[0]]
        variables = {key for key in environment(service) if key.startswith("CAPTIONSTREAM_")}
        unknown = variables - env_names(settings)
        assert not unknown, f"{name} sets {sorted(unknown)}, not fields of {settings.__name__}"


def test_only_project_services_set_captionstream_variables(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name not in project_services(services):
            assert not [key for key in environment(service) if key.startswith("CAPTIONSTREAM_")]


@pytest.mark.parametrize("name", ["gateway", "processor", "processor-gpu"])
def test_each_services_environment_parses_into_its_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for key in list(os.environ):
        if key.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(key)
    for key, value in environment(services[name]).items():
        monkeypatch.setenv(key, value)
    settings = SETTINGS_OF_COMMAND[command_of(services[name])[0]]()
    assert settings.model_dump()["kafka_bootstrap"] == "kafka:9092"
    assert settings.model_dump()["profile"] is KafkaProfile.KAFKA
    assert str(settings.model_dump()["data_dir"]) == "/data"


# --- topics -----------------------------------------------------------------------------


def test_topic_step_creates_exactly_the_projects_topics(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(topic_commands(services)) == {spec.name for spec in TOPICS.all()}


@pytest.mark.parametrize("spec", TOPICS.all(), ids=[spec.name for spec in TOPICS.all()])
def test_topics_are_compacted_exactly_when_the_code_says(
    services: dict[str, dict[str, Any]], spec: Any
) -> None:
    words = topic_commands(services)[spec.name]
    configs = option_values(words, "--config")
    assert ("cleanup.policy=compact" in configs) == spec.compacted, configs
    assert not [c for c in configs if c.startswith("cleanup.policy=") and c.endswith("delete")]


def test_partition_counts_match_the_services_setting(
    services: dict[str, dict[str, Any]],
) -> None:
    """The processor's table changelogs are created with CAPTIONSTREAM_PARTITIONS and
    must be co-partitioned with the images topic; the gateway would create a missing
    topic with it too."""
    settings = {
        environment(s).get("CAPTIONSTREAM_PARTITIONS") for s in project_services(services).values()
    }
    assert len(settings) == 1
    (partitions,) = settings
    assert partitions is not None
    assert int(partitions) >= 1
    for name, words in topic_commands(services).items():
        assert option_values(words, "--partitions") == [partitions], name


def test_topic_step_is_idempotent_and_topics_are_never_auto_created(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "--if-not-exists" in command_of(services["topics"])[-1]
    assert environment(services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


# --- start order, health, Kafka -----------------------------------------------------------


def test_topics_run_once_kafka_is_healthy_and_before_the_services(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "healthcheck" in services["kafka"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in project_services(services):
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


def test_model_cache_and_blobs_are_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    for name, service in workers(services).items():
        mounts = dict(reversed(str(v).split(":")[:2]) for v in service["volumes"])
        assert mounts[environment(service)["HF_HOME"]] in declared, name
    for name, service in project_services(services).items():
        mounts = dict(reversed(str(v).split(":")[:2]) for v in service["volumes"])
        blobs = f"{environment(service)['CAPTIONSTREAM_DATA_DIR']}/blobs"
        assert mounts[blobs] == "blobs", name  # one blob store for gateway and workers
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
