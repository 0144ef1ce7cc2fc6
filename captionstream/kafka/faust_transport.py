"""The Faust transport of a broker profile: what a worker's `kafka://` transport needs,
per profile, that Faust has no setting for. `KafkaConnection.faust_transport` picks it;
the processor adds its own consumer and transaction behaviour on top
(processor/transport.py).

- **Idempotent producer (kafka profile).** Faust turns on `enable_idempotence` only
  inside transactions; at-least-once workers would otherwise write a record twice when a
  produce request is retried after a lost answer. `IdempotentProducer` asks for it
  always. (The embedded broker rejects idempotence: `ClientTuning.idempotent_producer`.)
- **Where end offsets come from.** Faust's table recovery asks the consumer for each
  changelog partition's end offset (`Consumer.highwaters`) to know where recovery stops
  and to check the offsets its rocksdb stores persisted.
  - embedded: Tansu on s3:// storage answers ListOffsets too low (see
    `ClientTuning.highwaters_from_fetch`): a restarted worker then crashed with
    `ConsistencyError`, and a worker without old state stopped recovering early, with
    finished jobs and cancellations missing from its tables.
    `FetchHighwatersConsumerThread` answers with the high watermark of a fetch response
    (`readers.fetch_highwaters`), which Tansu gets right.
  - kafka: ListOffsets, under exactly-once too. There Faust answered
    `last_stable_offset()` from the fetch state: None (-1) for a changelog partition not
    fetched yet (one just assigned), which recovery took for an empty changelog, and a
    worker given back a partition it had held crashed (`ConsistencyError`).
    `ListOffsetsConsumerThread` asks the broker; a read_committed consumer gets the last
    stable offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from captionstream.kafka.readers import fetch_highwaters

if TYPE_CHECKING:
    from captionstream.kafka.connection import KafkaConnection


class ListOffsetsConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, taking end offsets from ListOffsets (kafka profile)."""

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        return dict(await consumer.end_offsets(list(partitions)))


class FetchHighwatersConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, taking end offsets from fetch responses (embedded)."""

    kafka: KafkaConnection  # given by the subclass `faust_transport` makes

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in partitions}
        ends = await fetch_highwaters(self.kafka, list(tps))
        return {tps[tp]: end for tp, end in ends.items()}


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's producer, idempotent outside transactions too (kafka profile)."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


def consumer_thread_for(kafka: KafkaConnection) -> type[faust_aiokafka.AIOKafkaConsumerThread]:
    """The consumer thread that reads end offsets where the profile's broker has them
    right."""
    if not kafka.tuning.highwaters_from_fetch:
        return ListOffsetsConsumerThread

    class ConsumerThread(FetchHighwatersConsumerThread):
        pass

    ConsumerThread.kafka = kafka
    return ConsumerThread


def faust_transport(kafka: KafkaConnection) -> type[faust_aiokafka.Transport]:
    """Faust's `kafka://` transport class with the profile's producer and consumer
    thread."""
    thread = consumer_thread_for(kafka)

    class ProfileConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return thread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        Consumer = ProfileConsumer
        if kafka.tuning.idempotent_producer:
            Producer = IdempotentProducer

    return Transport
