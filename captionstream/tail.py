"""`captionstream tail`: the public captions topic as JSON lines on stdout, for downstream
users and for looking at what the pipeline produces.

One event per line, the record value as published; from the end of the topic by default
(new events only), or from the beginning. It reads with a group-less consumer, so it
never joins or disturbs a consumer group.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TextIO

from aiokafka.errors import KafkaError

from captionstream.kafka import KafkaConnection, start_topic_reader, stop_consumer
from schemas.topics import TOPICS

log = logging.getLogger(__name__)


def event_line(raw: bytes | None) -> str | None:
    """The line printed for one record value, or None for a value that is not a JSON
    event (a tombstone or junk: stdout stays valid JSON lines)."""
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
        event = json.loads(text)
    except ValueError:  # UnicodeDecodeError is a ValueError
        log.warning("skipping a record that is not JSON: %r", raw[:80])
        return None
    if not isinstance(event, dict):
        log.warning("skipping a record that is not a JSON object: %r", raw[:80])
        return None
    # As published, unless a producer put line breaks in it (then re-serialised on one line).
    return text if "\n" not in text and "\r" not in text else json.dumps(event)


async def tail_captions(
    kafka: KafkaConnection,
    out: TextIO,
    *,
    from_beginning: bool = False,
    max_events: int | None = None,
    topic: str = TOPICS.captions.name,
) -> int:
    """Print caption events until `max_events` were printed (or forever); returns the count."""
    consumer = await start_topic_reader(kafka, topic, from_end=not from_beginning)
    log.info("reading %s from the %s", topic, "beginning" if from_beginning else "end")
    printed = 0
    try:
        while max_events is None or printed < max_events:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("fetch from %s failed (%r); retrying", topic, exc)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    line = event_line(record.value)
                    if line is None:
                        continue
                    out.write(line + "\n")
                    printed += 1
                    if max_events is not None and printed >= max_events:
                        break
                if max_events is not None and printed >= max_events:
                    break
            out.flush()
    finally:
        await stop_consumer(consumer)
    return printed
