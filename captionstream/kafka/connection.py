"""How a component reaches Kafka: the one place Kafka clients are constructed.

Every admin client, producer, consumer and the Faust app is built from a
`KafkaConnection`, so what a client needs to talk to the cluster (bootstrap servers, a
client id naming the component, the broker profile's tuning, and how it authenticates
and encrypts: `KafkaSecurity`) is decided once, not at each call site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from captionstream.kafka.profiles import ClientTuning, tuning_for
from captionstream.kafka.security import KafkaSecurity
from captionstream.settings import CommonSettings, KafkaCompression, KafkaProfile

if TYPE_CHECKING:
    from faust.transport.drivers.aiokafka import Transport as FaustTransport


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    bootstrap: str
    profile: KafkaProfile
    client_id: str = "captionstream"
    # Consumer groups (None: the profile's value).
    session_timeout_s: float | None = None
    heartbeat_interval_s: float | None = None
    rebalance_timeout_s: float | None = None  # None: the client library's default
    group_instance_id: str | None = None
    compression: KafkaCompression | None = None  # None: the profile's
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # PLAINTEXT

    @classmethod
    def from_settings(cls, settings: CommonSettings, role: str) -> KafkaConnection:
        """The connection of one component (`role`: gateway, processor, ingest, ...)."""
        return cls(
            bootstrap=settings.bootstrap,
            profile=settings.profile,
            client_id=f"{settings.kafka_client_id}-{role}",
            session_timeout_s=settings.kafka_session_timeout_s,
            heartbeat_interval_s=settings.kafka_heartbeat_interval_s,
            rebalance_timeout_s=settings.kafka_rebalance_timeout_s,
            group_instance_id=settings.kafka_group_instance_id,
            compression=settings.kafka_compression,
            security=KafkaSecurity.from_settings(settings),
        )

    @property
    def tuning(self) -> ClientTuning:
        return tuning_for(self.profile)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [server.strip() for server in self.bootstrap.split(",") if server.strip()]

    @property
    def session_timeout(self) -> float:
        return self.session_timeout_s or self.tuning.session_timeout_s

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_interval_s or self.tuning.heartbeat_interval_s

    @property
    def compression_type(self) -> str | None:
        if self.compression is None:
            return self.tuning.compression
        return None if self.compression is KafkaCompression.NONE else self.compression.value

    def _common(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            **self.security.aiokafka_kwargs(),
        }

    # --- aiokafka ----------------------------------------------------------------------

    def admin(self, request_timeout_s: float = 10) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(
            **self._common(), request_timeout_ms=int(request_timeout_s * 1000)
        )

    def client(self, request_timeout_s: float = 10) -> AIOKafkaClient:
        """A bare protocol client (metadata requests: readiness probes)."""
        return AIOKafkaClient(**self._common(), request_timeout_ms=int(request_timeout_s * 1000))

    def producer_kwargs(self, request_timeout_s: float | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {**self._common(), "acks": "all"}
        if self.tuning.idempotent_producer:
            kwargs["enable_idempotence"] = True
        if self.compression_type is not None:
            kwargs["compression_type"] = self.compression_type
        if self.tuning.producer_max_batch_size is not None:
            kwargs["max_batch_size"] = self.tuning.producer_max_batch_size
        if request_timeout_s is not None:
            kwargs["request_timeout_ms"] = int(request_timeout_s * 1000)
        return kwargs

    def producer(self, request_timeout_s: float | None = None) -> AIOKafkaProducer:
        """Every record acknowledged by all in-sync replicas, never written twice by a
        retry (where the broker allows), compressed (per profile)."""
        return AIOKafkaProducer(**self.producer_kwargs(request_timeout_s))

    @property
    def isolation_level(self) -> str:
        """Readers see committed records only where transactions exist: an exactly-once
        worker's writes of an aborted transaction (a worker killed mid-batch) are never
        read. Without transactions on the log the two levels read the same."""
        return "read_committed" if self.tuning.transactions else "read_uncommitted"

    def reader(self, **overrides: Any) -> AIOKafkaConsumer:
        """A group-less consumer: the caller assigns partitions; nothing is committed."""
        kwargs: dict[str, Any] = {
            **self._common(),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "isolation_level": self.isolation_level,
        }
        return AIOKafkaConsumer(**{**kwargs, **overrides})

    def group_kwargs(self) -> dict[str, Any]:
        """Consumer-group membership settings, in aiokafka's names."""
        kwargs: dict[str, Any] = {
            "session_timeout_ms": int(self.session_timeout * 1000),
            "heartbeat_interval_ms": int(self.heartbeat_interval * 1000),
        }
        if self.rebalance_timeout_s is not None:
            kwargs["rebalance_timeout_ms"] = int(self.rebalance_timeout_s * 1000)
        if self.group_instance_id is not None:
            kwargs["group_instance_id"] = self.group_instance_id
        return kwargs

    def group_consumer(self, group_id: str, **overrides: Any) -> AIOKafkaConsumer:
        """A consumer in `group_id` that commits its offsets itself (no auto-commit)."""
        kwargs: dict[str, Any] = {
            **self._common(),
            **self.group_kwargs(),
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "isolation_level": self.isolation_level,
        }
        return AIOKafkaConsumer(**{**kwargs, **overrides})

    # --- Faust -------------------------------------------------------------------------

    def faust_settings(self) -> dict[str, Any]:
        """Keyword arguments for `faust.App`: the same connection for the worker.

        `env={}`: Faust would otherwise let unprefixed environment variables
        (`BROKER_URL`, `TOPIC_PARTITIONS`, ...) override these, so a stray variable from
        another service's environment could point a worker at another cluster.
        What the profile needs that is no Faust setting (producer idempotence, where
        end offsets come from) is in its transport: `faust_transport`.
        """
        settings: dict[str, Any] = {
            "env": {},
            "broker": [f"kafka://{server}" for server in self.bootstrap_servers],
            "broker_client_id": self.client_id,
            "broker_session_timeout": self.session_timeout,
            "broker_heartbeat_interval": self.heartbeat_interval,
            "producer_acks": -1,
        }
        credentials = self.security.faust_credentials()
        if credentials is not None:
            settings["broker_credentials"] = credentials
        if self.rebalance_timeout_s is not None:
            settings["broker_rebalance_timeout"] = self.rebalance_timeout_s
        if self.group_instance_id is not None:
            settings["consumer_group_instance_id"] = self.group_instance_id
        if self.compression_type is not None:
            settings["producer_compression_type"] = self.compression_type
        if self.tuning.producer_max_batch_size is not None:
            settings["producer_max_batch_size"] = self.tuning.producer_max_batch_size
        return settings

    def faust_transport(self) -> type[FaustTransport]:
        """The Faust app's `kafka://` transport class, as the profile needs it
        (`captionstream.kafka.faust_transport`); the worker builds on it."""
        # Faust is the processor's dependency: imported only where a worker needs it.
        from captionstream.kafka.faust_transport import faust_transport

        return faust_transport(self)
