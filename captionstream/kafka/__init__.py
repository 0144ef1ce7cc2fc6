"""The one Kafka layer: connections (every client is built here), broker profiles, the
topic plan, and group-less readers.

- `connection`: `KafkaConnection`, from the settings, builds admin clients, producers,
  consumers and the Faust app's broker settings.
- `profiles`: what Apache Kafka and the embedded broker each need from clients; every
  workaround for the embedded broker lives there.
- `topics`: every topic, declared once, created and verified explicitly.
- `readers`: the read loop (`polls`), whole-topic readers, end offsets from fetches,
  single records.
"""

from captionstream.kafka.connection import KafkaConnection
from captionstream.kafka.profiles import (
    EMBEDDED_PROFILE,
    KAFKA_PROFILE,
    ClientTuning,
    tuning_for,
)
from captionstream.kafka.readers import (
    assign_whole_topic,
    fetch_highwaters,
    list_topics,
    polls,
    read_record_at,
    readable_end,
    start_topic_reader,
    stop_consumer,
)
from captionstream.kafka.topics import (
    PlannedTopic,
    ensure_topics,
    own_topics,
    processor_topics,
    topic_config,
    topic_plan,
)

__all__ = [
    "EMBEDDED_PROFILE",
    "KAFKA_PROFILE",
    "ClientTuning",
    "KafkaConnection",
    "PlannedTopic",
    "assign_whole_topic",
    "ensure_topics",
    "fetch_highwaters",
    "list_topics",
    "own_topics",
    "polls",
    "processor_topics",
    "read_record_at",
    "readable_end",
    "start_topic_reader",
    "stop_consumer",
    "topic_config",
    "topic_plan",
    "tuning_for",
]
