"""Faust's Kafka transport with end offsets from fetch responses (embedded profile only).

Faust's table recovery asks the consumer for each changelog partition's end offset
(`Consumer.highwaters`, i.e. aiokafka's `end_offsets()`, ListOffsets) to know where
recovery stops and to check the offsets its rocksdb stores persisted. Tansu on s3://
storage answers ListOffsets too low (see `ClientTuning.highwaters_from_fetch` in
captionstream/kafka.py): a restarted worker then crashed with `ConsistencyError`
(persisted offset above the "highwater"), and a worker without old state stopped
recovering early, with finished jobs and cancellations missing from its tables.

This transport answers `highwaters` with the high watermark of a fetch response
(`fetch_highwaters`), which Tansu gets right; nothing else differs from Faust's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from captionstream.kafka import fetch_highwaters


class FetchHighwaterConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        if self.consumer.in_transaction:  # never on the embedded broker (no transactions)
            return await super()._highwaters(partitions)
        bootstrap = ",".join(
            faust_aiokafka.server_list(self.transport.url, faust_aiokafka.Transport.default_port)
        )
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in partitions}
        ends = await fetch_highwaters(bootstrap, list(tps))
        return {tps[tp]: end for tp, end in ends.items()}


class FetchHighwaterConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return FetchHighwaterConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchHighwaterTransport(faust_aiokafka.Transport):
    """`kafka://` transport whose consumer reads end offsets from fetch responses."""

    Consumer = FetchHighwaterConsumer


def use_fetch_highwaters(app: Any) -> None:
    """Give `app` (a `faust.App`, before it made its transport) this transport."""
    app.transport = FetchHighwaterTransport(app.conf.broker_consumer, app)
