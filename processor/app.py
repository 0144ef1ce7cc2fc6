"""Faust wiring: the app, its topics, the job table and a thin agent loop.

All behaviour lives in `processor.pipeline`; this module only connects it to Kafka.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from captionstream.kafka import tuning_for
from captionstream.settings import ProcessorSettings
from ingest.blobstore import LocalBlobStore
from processor.captioner import Captioner
from processor.pipeline import CaptionResult, Delivery, caption_batch, handle_batch
from schemas.events import ImageSubmitted, JobState, decode_job_state
from schemas.topics import TOPICS

log = logging.getLogger(__name__)


class TableStateStore:
    """`JobStateStore` on a Faust table (rocksdb store, changelog-backed).

    Faust routes a table write to the changelog partition of "the current event"; in a
    batch we are handling many events, so each write names its own event explicitly.
    """

    def __init__(self, table: Any, stream: Any) -> None:
        self.table = table
        self.stream = stream

    def get(self, job_id: str) -> JobState | None:
        raw = self.table.get(job_id.encode())
        return None if raw is None else decode_job_state(raw)

    def put(self, state: JobState, origin: Any) -> None:
        self.stream._set_current_event(origin)
        self.table[state.job_id.encode()] = state.model_dump_json().encode()


class TopicSink:
    """`ResultSink` on Faust topics; each send is awaited until the broker acked it."""

    def __init__(self, captions: faust.TopicT, job_state: faust.TopicT) -> None:
        self.captions = captions
        self.job_state = job_state

    async def _send(self, topic: faust.TopicT, key: str, value: str) -> None:
        fut = await topic.send(key=key.encode(), value=value.encode())
        await fut

    async def publish_state(self, state: JobState) -> None:
        await self._send(self.job_state, state.job_id, state.model_dump_json())

    async def publish_caption(self, event: CaptionResult) -> None:
        await self._send(self.captions, event.job_id, event.model_dump_json())


@dataclass
class ProcessorApp:
    app: faust.App
    images: faust.TopicT


def create_app(
    settings: ProcessorSettings, captioner: Captioner, blobs: LocalBlobStore, datadir: Path
) -> ProcessorApp:
    app = faust.App(
        settings.group_id,
        broker=f"kafka://{settings.bootstrap}",
        store="rocksdb://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        # Keys are job ids as plain UTF-8 and values our own JSON, on topics and the table
        # alike: Faust's key encoding can never route a job differently than the gateway.
        key_serializer="raw",
        value_serializer="raw",
        **tuning_for(settings.profile).faust_kwargs(),
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    images = raw_topic(TOPICS.images.name)
    sink = TopicSink(raw_topic(TOPICS.captions.name), raw_topic(TOPICS.job_state.name))
    jobs = app.Table(
        "jobs",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
    )
    # One inference thread per worker: the model is not re-entrant, and one batch at a
    # time on all cores beats two batches fighting over them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    caption = functools.partial(
        caption_batch,
        read_blob=blobs.get_sync,
        captioner=captioner,
        max_pixels=settings.max_pixels,
    )

    async def run_captioning(batch: list[ImageSubmitted]) -> list[CaptionResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, caption, batch)

    @app.agent(images)
    async def caption_images(stream: Any) -> None:
        store = TableStateStore(jobs, stream)
        async for events in stream.take_events(
            settings.max_batch_size, within=settings.max_batch_wait_s
        ):
            deliveries = [Delivery(value=event.value, origin=event) for event in events]
            await handle_batch(deliveries, store=store, sink=sink, run_captioning=run_captioning)

    return ProcessorApp(app=app, images=images)
