"""`captionstream tail`: the public captions topic as JSON lines on stdout, for downstream
users and for looking at what the pipeline produces.

One event per line, the record value as published; from the end of the topic by default
(new events only), or from the beginning. It reads with a group-less consumer, so it
never joins or disturbs a consumer group.
"""

from __future__ import annotations

import json
import logging
from typing import TextIO

from captionstream.kafka import KafkaConnection, polls, start_topic_reader, stop_consumer
from captionstream.schemas.topics import TOPICS

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

    def done() -> bool:
        return max_events is not None and printed >= max_events

    try:
        if done():
            return printed
        async for batches in polls(consumer, topic):
            lines = (event_line(r.value) for records in batches.values() for r in records)
            for line in lines:
                if line is not None:
                    out.write(line + "\n")
                    printed += 1
                    if done():
                        break
            out.flush()
            if done():
                break
    finally:
        await stop_consumer(consumer)
    return printed
