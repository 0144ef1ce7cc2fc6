"""Broker profiles: what each kind of broker needs from its clients.

`kafka` is Apache Kafka and every compliant broker (MSK, Confluent, Redpanda): producers
are idempotent and compress, consumer-group timeouts are short enough that a dead worker's
partitions move within seconds. `embedded` is the Tansu broker of `make run`, and every
workaround for its defects lives here and only here (see `EMBEDDED_PROFILE`).
"""

from __future__ import annotations

from dataclasses import dataclass

from captionstream.settings import KafkaProfile


@dataclass(frozen=True, slots=True)
class ClientTuning:
    # One record per produce batch. Tansu reports end offsets as "base offset of the last
    # batch + 1", which breaks end_offsets(), lag and Faust's rocksdb recovery otherwise.
    producer_max_batch_size: int | None = None
    # Take end offsets from the high watermark of a fetch response, never from ListOffsets
    # alone. Tansu 0.6.0 on s3:// storage answers ListOffsets(latest) from a listing of
    # the partition's batch objects: it takes the batch with the newest S3 Last-Modified,
    # and of batches stored within the same second (S3's resolution) the *first*, then
    # answers its base offset + its record count. Any batches stored later in that
    # second are missed: 1 after 12 records, 13 after 15. No client setting changes that
    # (batch size, isolation level, API version: measured). Its fetch responses carry
    # the watermark the broker keeps for each partition, which is right. Faust's table
    # recovery reads end offsets (ListOffsets) to know where a changelog ends: too low,
    # a restarted worker crashed (ConsistencyError) or recovered its tables partly.
    # See `readers.fetch_highwaters` and `faust_transport`.
    highwaters_from_fetch: bool = False
    # Consumer groups: how long a silent member keeps its partitions, and how often a
    # live one says so. Tansu holds JoinGroup for session_timeout/2, so it needs them
    # short for rebalances to be fast at all.
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 3.0
    # Idempotent producers: a retried send is never written twice. Tansu rejects the
    # InitProducerId v0 request that aiokafka sends, so neither idempotence nor
    # transactions (exactly-once) exist on it.
    idempotent_producer: bool = True
    transactions: bool = True
    # Events are small JSON documents that compress well; lz4 is cheap on both ends.
    compression: str | None = "lz4"


KAFKA_PROFILE = ClientTuning()
EMBEDDED_PROFILE = ClientTuning(
    producer_max_batch_size=1,
    highwaters_from_fetch=True,
    session_timeout_s=4.0,
    heartbeat_interval_s=1.0,
    idempotent_producer=False,
    transactions=False,
    compression=None,
)


def tuning_for(profile: KafkaProfile) -> ClientTuning:
    return EMBEDDED_PROFILE if profile is KafkaProfile.EMBEDDED else KAFKA_PROFILE
