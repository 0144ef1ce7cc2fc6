"""Faust's Kafka transport, adapted to the broker profile: the worker's only reach into
Faust's transport internals.

- **Idempotent producer (kafka profile).** Faust turns on `enable_idempotence` only inside
  transactions; at-least-once workers would otherwise write a record twice when a produce
  request is retried after a lost answer. `IdempotentProducer` asks for it always.
- **End offsets from fetch responses (embedded profile).** Faust's table recovery asks the
  consumer for each changelog partition's end offset (`Consumer.highwaters`, i.e.
  aiokafka's `end_offsets()`, ListOffsets) to know where recovery stops and to check the
  offsets its rocksdb stores persisted. Tansu on s3:// storage answers ListOffsets too
  low (see `captionstream.kafka.profiles.ClientTuning.highwaters_from_fetch`): a
  restarted worker then crashed with `ConsistencyError`, and a worker without old state
  stopped recovering early, with finished jobs and cancellations missing from its tables.
  `FetchHighwaterConsumer` answers `highwaters` with the high watermark of a fetch
  response (`fetch_highwaters`), which Tansu gets right.
- **No records lost when a rebalance ends (every profile).** When table recovery ends,
  Faust resumes the stream partitions, seeks them to their committed offsets and only
  then resumes `app.flow_control`, which empties every agent's queue; but the consumer's
  flow is already on at that point (recovery turned it on to read changelogs), so records
  fetched during the seek reach the queues and are thrown away with them. They are never
  acked, the partition's commits stop there, and the fetch position is past them: those
  jobs stayed PENDING until the next rebalance (seen as 3-10 jobs stuck after a worker was
  SIGKILLed, about one run in five). `FlowSafeRecovery` stops the flow first, so nothing
  is fetched between resuming the partitions and emptying the queues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from captionstream.kafka import KafkaConnection, fetch_highwaters


class FetchHighwaterConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    kafka: KafkaConnection  # given by the subclass `transport_for` makes

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        if self.consumer.in_transaction:  # never on the embedded broker (no transactions)
            return await super()._highwaters(partitions)
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in partitions}
        ends = await fetch_highwaters(self.kafka, list(tps))
        return {tps[tp]: end for tp, end in ends.items()}


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


def transport_for(kafka: KafkaConnection) -> type[faust_aiokafka.Transport]:
    """A `kafka://` transport class with the profile's producer and consumer."""

    class ConsumerThread(FetchHighwaterConsumerThread):
        pass

    ConsumerThread.kafka = kafka

    class FetchHighwaterConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        if kafka.tuning.idempotent_producer:
            Producer = IdempotentProducer
        if kafka.tuning.highwaters_from_fetch:
            Consumer = FetchHighwaterConsumer

    return Transport


def use_transport(app: Any, kafka: KafkaConnection) -> None:
    """Give `app` (a `faust.App`, before it made its transport) the profile's transport."""
    app.transport = transport_for(kafka)(app.conf.broker_consumer, app)


class FlowSafeRecovery(Recovery):
    """Faust's table recovery, with the consumer's flow stopped while the stream
    partitions are resumed and sought (see the module docstring)."""

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        await super().on_recovery_completed(generation_id)

    async def _resume_streams(self, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        await super()._resume_streams(generation_id)


class FlowSafeTableManager(TableManager):
    """Faust's table manager with `FlowSafeRecovery`; given as `faust.App(TableManager=)`."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = FlowSafeRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
