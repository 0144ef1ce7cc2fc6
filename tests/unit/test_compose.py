"""docker-compose.kafka.yml, checked against the code it deploys (no Docker engine here:
this is the check). Settings the services set must exist, Kafka must be the version the
project pins, the topics step must be the project's own `captionstream topics --create`
with the workers' settings (so it creates exactly the plan the code declares), workers
must scale, images must go to the compose file's S3 store (no shared blob volume), every
Kafka client must get the Kafka security settings, and each GPU worker its own GPU.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from xml.etree import ElementTree

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs in the dev dependencies
from pydantic_settings import BaseSettings

from captionstream.apache_kafka import KAFKA_VERSION, POM_PATH
from captionstream.cli import build_parser, cmd_topics
from captionstream.ingest.s3_blobstore import parse_store_url
from captionstream.kafka.topics import (
    PROCESSOR_TABLES,
    changelog_topic,
    leader_topic,
    topic_plan,
)
from captionstream.schemas.topics import TOPICS
from captionstream.settings import (
    CommonSettings,
    GatewaySettings,
    KafkaProfile,
    KafkaSaslMechanism,
    KafkaSecurityProtocol,
    ProcessorSettings,
)

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
# One service per GPU (`--profile gpu`), each reserving its own device.
GPU_WORKERS = ("processor-gpu-0", "processor-gpu-1")
# The S3-compatible blob store and the one-shot step that creates its bucket.
S3_SERVICE = "minio"
BUCKET_STEP = "blob-bucket"
# Every Kafka security setting of CommonSettings (taken from the class, so a new one must
# be passed through too), as environment variables.
KAFKA_SECURITY_VARIABLES = sorted(
    f"CAPTIONSTREAM_{field}".upper()
    for field in CommonSettings.model_fields
    if field.startswith(("kafka_security_", "kafka_sasl_", "kafka_ssl_"))
)

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


def environment(
    service: Mapping[str, Any], shell: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A service's environment, interpolated (dict or `KEY=value` list form) with `shell`
    as the variables set in the shell (or `.env`)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: interpolate(str(value), shell) for key, value in raw.items()}


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


def settings_of(
    service: Mapping[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    index: int = 0,
    shell: Mapping[str, str] | None = None,
) -> Any:
    """The settings the service's command reads, from the service's environment only
    (interpolated with `shell`)."""
    for key in list(os.environ):
        if key.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(key)
    for key, value in environment(service, shell).items():
        monkeypatch.setenv(key, value)
    return SETTINGS_OF_COMMAND[command_of(service)[0]][index]()


def all_settings_of(
    service: Mapping[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    shell: Mapping[str, str] | None = None,
) -> list[Any]:
    """Every settings class the service's command reads, from its environment."""
    classes = SETTINGS_OF_COMMAND[command_of(service)[0]]
    return [settings_of(service, monkeypatch, index, shell) for index in range(len(classes))]


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
    assert {"gateway", "processor", *GPU_WORKERS, "topics"} <= set(found)
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


@pytest.mark.parametrize("name", ["gateway", "processor", *GPU_WORKERS, "topics"])
def test_each_services_environment_parses_into_its_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for index in range(len(SETTINGS_OF_COMMAND[command_of(services[name])[0]])):
        settings = settings_of(services[name], monkeypatch, index)
        assert settings.model_dump()["kafka_bootstrap"] == "kafka:9092"
        assert settings.model_dump()["profile"] is KafkaProfile.KAFKA
        assert str(settings.model_dump()["data_dir"]) == "/data"


# --- Kafka security and webhooks ----------------------------------------------------------


def test_security_settings_are_the_ones_the_compose_file_passes() -> None:
    """The list the tests below check every service against, from CommonSettings."""
    assert {
        "CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL",
        "CAPTIONSTREAM_KAFKA_SASL_MECHANISM",
        "CAPTIONSTREAM_KAFKA_SASL_USERNAME",
        "CAPTIONSTREAM_KAFKA_SASL_PASSWORD",
        "CAPTIONSTREAM_KAFKA_SASL_OAUTH_TOKEN_PROVIDER",
        "CAPTIONSTREAM_KAFKA_SSL_CAFILE",
        "CAPTIONSTREAM_KAFKA_SSL_CERTFILE",
        "CAPTIONSTREAM_KAFKA_SSL_KEYFILE",
        "CAPTIONSTREAM_KAFKA_SSL_KEY_PASSWORD",
    } <= set(KAFKA_SECURITY_VARIABLES)


def test_every_kafka_client_passes_the_security_settings_through(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every service that talks to Kafka (all the project's: topics, gateway, workers)
    takes each security setting from the shell (or `.env`) under its own name."""
    kafka_clients = project_services(services)
    assert {"topics", "gateway", "processor", *GPU_WORKERS} <= set(kafka_clients)
    for name, service in kafka_clients.items():
        for variable in KAFKA_SECURITY_VARIABLES:
            assert variable in environment(service), f"{name} does not pass {variable}"
            shell = {variable: "from-the-shell"}
            assert environment(service, shell)[variable] == "from-the-shell", (name, variable)


def test_unset_security_settings_give_the_defaults(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing set in the shell: the services get empty values (PLAINTEXT for the
    protocol), which parse as unset, i.e. as with no variable at all."""
    defaults = CommonSettings.model_construct()
    for name, service in project_services(services).items():
        for settings in all_settings_of(service, monkeypatch):
            for variable in KAFKA_SECURITY_VARIABLES:
                field = variable.removeprefix("CAPTIONSTREAM_").lower()
                assert getattr(settings, field) == getattr(defaults, field), (name, field)


def test_empty_security_settings_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`CAPTIONSTREAM_KAFKA_SASL_MECHANISM=` is no mechanism (not an invalid one), an
    empty file setting no file (not "no such file" or "TLS files without TLS")."""
    for key in list(os.environ):
        if key.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(key)
    for variable in KAFKA_SECURITY_VARIABLES:
        monkeypatch.setenv(variable, "")
    settings = CommonSettings()
    assert settings.kafka_security_protocol is KafkaSecurityProtocol.PLAINTEXT
    assert settings.kafka_ssl_check_hostname is True
    for field in (
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_sasl_oauth_token_provider",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_key_password",
    ):
        assert getattr(settings, field) is None, field


def test_security_settings_from_the_shell_reach_every_kafka_client(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    shell = {
        "CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CAPTIONSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CAPTIONSTREAM_KAFKA_SASL_USERNAME": "captionstream",
        "CAPTIONSTREAM_KAFKA_SASL_PASSWORD": "s3cret",
        "CAPTIONSTREAM_KAFKA_SSL_CAFILE": str(ca),
        "CAPTIONSTREAM_KAFKA_SSL_CHECK_HOSTNAME": "false",
    }
    for name, service in project_services(services).items():
        for settings in all_settings_of(service, monkeypatch, shell):
            assert settings.kafka_security_protocol is KafkaSecurityProtocol.SASL_SSL, name
            assert settings.kafka_sasl_mechanism is KafkaSaslMechanism.SCRAM_SHA_512, name
            assert settings.kafka_sasl_username == "captionstream", name
            assert settings.kafka_sasl_password.get_secret_value() == "s3cret", name
            assert settings.kafka_ssl_cafile == ca, name
            assert settings.kafka_ssl_check_hostname is False, name
            assert settings.kafka_ssl_certfile is None, name


def test_gateway_passes_webhook_settings_through_off_by_default(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = services["gateway"]
    webhook_variables = {key for key in environment(gateway) if "_WEBHOOK_" in key}
    assert {
        "CAPTIONSTREAM_WEBHOOK_SECRET",
        "CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS",
        "CAPTIONSTREAM_WEBHOOK_ALLOW_NETWORKS",
    } <= webhook_variables
    off = settings_of(gateway, monkeypatch)
    assert not off.webhooks_enabled
    assert off.webhook_allow_hosts == []
    assert off.webhook_allow_networks == []
    shell = {
        "CAPTIONSTREAM_WEBHOOK_SECRET": "hmac-key",
        "CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS": "hooks.internal, Other.Internal",
        "CAPTIONSTREAM_WEBHOOK_ALLOW_NETWORKS": "10.1.2.0/24",
    }
    on = settings_of(gateway, monkeypatch, shell=shell)
    assert on.webhooks_enabled
    assert on.webhook_allow_hosts == ["hooks.internal", "other.internal"]
    assert [str(network) for network in on.webhook_allow_networks] == ["10.1.2.0/24"]


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
    assert {"gateway", "processor", *GPU_WORKERS} <= set(long_running(services))
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
    assert {"processor", *GPU_WORKERS} <= set(workers(services))
    for name, service in workers(services).items():
        assert "container_name" not in service, name
        assert "hostname" not in service, name
        assert fixed_host_ports(service) == [], name


def gpu_reservations(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The service's reserved NVIDIA GPU devices."""
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [
        device
        for device in reservations.get("devices", [])
        if device.get("driver") == "nvidia" or "gpu" in device.get("capabilities", [])
    ]


def test_gpu_workers_are_a_profile_with_an_nvidia_device(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "profiles" not in services["processor"]  # CPU workers start by default
    for name in GPU_WORKERS:
        gpu = services[name]
        assert gpu["profiles"] == ["gpu"], name
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert environment(gpu)["CAPTIONSTREAM_DEVICE"] == "cuda", name


def test_each_gpu_worker_reserves_its_own_gpu(services: dict[str, dict[str, Any]]) -> None:
    """`count: 1` on one scaled service gives every replica the same device (the first
    GPU): each GPU worker is its own service naming exactly one device id, none shared."""
    reserving = {name for name, service in services.items() if gpu_reservations(service)}
    assert reserving == set(GPU_WORKERS)
    owner: dict[str, str] = {}
    for name in GPU_WORKERS:
        (device,) = gpu_reservations(services[name])
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, name  # count and device_ids exclude each other
        ids = [str(i) for i in device["device_ids"]]
        assert len(ids) == 1, f"{name} reserves {ids}"
        (device_id,) = ids
        assert device_id not in owner, f"{name} and {owner.get(device_id)} share GPU {device_id}"
        owner[device_id] = name
    assert sorted(owner) == [str(i) for i in range(len(GPU_WORKERS))]


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


def test_model_cache_and_object_store_are_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    for name, service in workers(services).items():
        assert mounts(service)[environment(service)["HF_HOME"]] in declared, name
    assert mounts(services[S3_SERVICE])["/data"] in declared
    assert "/data" in command_of(services[S3_SERVICE])  # `minio server /data`


# --- blob store ------------------------------------------------------------------------------


def test_no_service_mounts_a_shared_blob_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Images go to the S3 store, so workers may run on any host: the gateway and the
    workers share no volume (the workers share only the model cache, a cache)."""
    assert "blobs" not in (compose.get("volumes") or {})
    for name, service in project_services(services).items():
        blobs = f"{environment(service)['CAPTIONSTREAM_DATA_DIR']}/blobs"
        for target, source in mounts(service).items():
            assert not target.startswith(blobs), f"{name} mounts {source} at {target}"
            assert source != "blobs", name
    gateway = set(mounts(services["gateway"]).values())
    for name, service in workers(services).items():
        shared = gateway & set(mounts(service).values())
        assert not shared, f"gateway and {name} share {shared}"


def s3_endpoint_service(services: Mapping[str, dict[str, Any]], url: str) -> str:
    """The compose service an `http://service:port` endpoint names (port checked)."""
    endpoint = urlparse(url)
    assert endpoint.scheme == "http", url
    assert endpoint.hostname in services, url
    command = command_of(services[endpoint.hostname])
    assert command[:1] == ["server"], command  # `minio server ...`: S3 API on port 9000
    assert endpoint.port == 9000, url
    return endpoint.hostname


def test_gateway_and_workers_use_the_compose_s3_store(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One s3:// store for the gateway and every worker, on the compose S3 service, which
    they start after (healthy, and its bucket created), with its credentials."""
    stores = set()
    for name, service in long_running(services).items():
        settings = settings_of(service, monkeypatch)
        assert settings.blob_store is not None, name
        assert urlparse(settings.blob_store).scheme == "s3", name
        stores.add(settings.blob_store)
        assert settings.s3_endpoint_url is not None, name
        assert s3_endpoint_service(services, settings.s3_endpoint_url) == S3_SERVICE, name
        assert settings.s3_region, name
        depends = service["depends_on"]
        assert depends[S3_SERVICE]["condition"] == "service_healthy", name
        assert depends[BUCKET_STEP]["condition"] == "service_completed_successfully", name
        for shell in ({}, {"MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p" * 12}):
            env, store = environment(service, shell), environment(services[S3_SERVICE], shell)
            assert env["AWS_ACCESS_KEY_ID"] == store["MINIO_ROOT_USER"], name
            assert env["AWS_SECRET_ACCESS_KEY"] == store["MINIO_ROOT_PASSWORD"], name
    assert len(stores) == 1, stores
    assert "healthcheck" in services[S3_SERVICE]


def step_commands(service: Mapping[str, Any]) -> list[list[str]]:
    """The commands of a `sh -c '... && ...'` step, split into words."""
    entrypoint = service.get("entrypoint")
    assert entrypoint == ["/bin/sh", "-c"], entrypoint
    (script,) = command_of(service)
    return [shlex.split(part) for part in interpolate(script).split("&&")]


def test_bucket_step_creates_the_blob_stores_bucket(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services check the bucket at start-up and never create it: the step does, on
    the services' endpoint, once the store is healthy, and exits 0 if it exists."""
    step = services[BUCKET_STEP]
    assert step.get("restart") == "no"
    assert step["depends_on"][S3_SERVICE]["condition"] == "service_healthy"
    settings = settings_of(services["gateway"], monkeypatch)
    bucket, _prefix = parse_store_url(settings.blob_store)
    alias, creates = step_commands(step)
    assert alias[:3] == ["mc", "alias", "set"]
    name, url, user, password = alias[3:]
    assert url == settings.s3_endpoint_url
    assert (user, password) == ("$MINIO_ROOT_USER", "$MINIO_ROOT_PASSWORD")  # from its env
    env, store = environment(step), environment(services[S3_SERVICE])
    assert env["MINIO_ROOT_USER"] == store["MINIO_ROOT_USER"]
    assert env["MINIO_ROOT_PASSWORD"] == store["MINIO_ROOT_PASSWORD"]
    assert creates == ["mc", "mb", "--ignore-existing", f"{name}/{bucket}"]


def test_s3_images_are_pinned_and_ports_stay_on_the_host(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in (S3_SERVICE, BUCKET_STEP):
        image = str(services[name]["image"])
        assert re.fullmatch(r"quay\.io/minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", image)
    for port in services[S3_SERVICE]["ports"]:
        assert interpolate(str(port)).startswith("127.0.0.1:"), port


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
