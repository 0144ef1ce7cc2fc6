"""`captionstream worker`: load the model, then run one Faust worker until signalled."""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import logging
import os
from pathlib import Path
from typing import IO

import faust

from captionstream.errors import ConfigurationError
from captionstream.ingest.blobstore import open_blob_store
from captionstream.ingest.validation import allow_pixels
from captionstream.kafka import KafkaConnection, ensure_topics, topic_plan, tuning_for
from captionstream.logging_config import LogFormat, adopt_library_output, faust_logging_config
from captionstream.processor.allocator import tune_malloc
from captionstream.processor.app import create_app
from captionstream.processor.captioner import BlipCaptioner, Captioner, GenerationDefaults
from captionstream.processor.hf_captioner import HFImageToTextCaptioner
from captionstream.processor.inference import InferenceThread
from captionstream.processor.table_state import KafkaChangelogReader, discard_stale_table_state
from captionstream.processor.threads import settle_threads
from captionstream.settings import ProcessingGuarantee, ProcessorSettings

log = logging.getLogger(__name__)


def claim_worker_dir(root: Path) -> tuple[Path, IO[str]]:
    """Take the first free `worker-N` state directory under `root`.

    Faust's rocksdb files allow one process each, so workers sharing a data dir each
    take their own slot; the lock is held (the file stays open) for the process life.
    """
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = root / f"worker-{n}"
        path.mkdir(exist_ok=True)
        lock = open(path / ".lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            n += 1
            continue
        return path, lock


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def configure_torch_threads(requested: int | None) -> None:
    """The requested thread count, or (until `settle_threads` decides) every core this
    process may use."""
    threads = requested or len(os.sched_getaffinity(0))
    set_torch_threads(threads)
    if requested is not None:
        log.info("torch intra-op threads: %d (CAPTIONSTREAM_TORCH_THREADS)", threads)


def load_captioner(settings: ProcessorSettings) -> Captioner:
    """The captioner named by CAPTIONSTREAM_CAPTIONER: `blip`, `hf-image-to-text` (any
    model `AutoModelForImageTextToText` loads), or `package.module:factory` for a plugin
    (a callable taking the settings and returning a `Captioner`)."""
    if settings.captioner == "blip":
        return BlipCaptioner.load(
            settings.model,
            data_dir=settings.data_dir,
            device=settings.device,
            precision=settings.precision,
            defaults=GenerationDefaults(settings.max_new_tokens, settings.num_beams),
            lean_decoder=settings.lean_decoder,
            prepack_weights=settings.prepack_weights,
            vision_attention=settings.vision_attention,
        )
    if settings.captioner == "hf-image-to-text":
        return HFImageToTextCaptioner.load(
            settings.model,
            data_dir=settings.data_dir,
            device=settings.device,
            precision=settings.precision,
            defaults=GenerationDefaults(settings.max_new_tokens, settings.num_beams),
        )
    module_name, _, attr = settings.captioner.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"CAPTIONSTREAM_CAPTIONER={settings.captioner!r}: expected 'blip', "
            f"'hf-image-to-text' or 'package.module:factory' ({exc})"
        ) from exc
    captioner: Captioner = factory(settings)
    return captioner


def refuse_unsupported_guarantee(settings: ProcessorSettings) -> None:
    """Exactly-once needs Kafka transactions: refuse at once on a broker without them,
    rather than fail on the first batch (or, worse, silently run at-least-once)."""
    if settings.processing_guarantee is not ProcessingGuarantee.EXACTLY_ONCE:
        return
    if not tuning_for(settings.profile).transactions:
        raise ConfigurationError(
            "CAPTIONSTREAM_PROCESSING_GUARANTEE=exactly_once needs Kafka transactions, "
            f"which the {settings.profile.value} broker profile does not have (the embedded "
            "broker rejects them). Use Apache Kafka or a compatible broker "
            "(CAPTIONSTREAM_KAFKA_PROFILE=kafka), or processing_guarantee=at_least_once."
        )


def run_worker(settings: ProcessorSettings) -> None:
    refuse_unsupported_guarantee(settings)
    if settings.log_format is LogFormat.JSON:
        adopt_library_output()  # no plain-text lines from transformers' logger or bars
    # Before torch and the inference thread allocate: the arena limit only applies to
    # arenas created after it.
    tune_malloc(settings.malloc_tuning, keep_bytes=settings.malloc_keep_bytes)
    # Before the model loads (tens of seconds): a blob store it cannot read fails at once.
    blobs = open_blob_store(settings)
    blobs.check()
    # Every torch call from here on runs on the one inference thread (processor.inference).
    inference = InferenceThread()
    inference.call(configure_torch_threads, settings.torch_threads)
    allow_pixels(settings.max_pixels)
    # The model loads before the worker joins the group: a worker never holds partitions
    # it cannot serve, and a bad model setting fails at once.
    captioner = inference.call(load_captioner, settings)
    if settings.torch_threads is None:
        cores = len(os.sched_getaffinity(0))
        inference.call(settle_threads, captioner, cores, set_torch_threads)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    kafka = KafkaConnection.from_settings(settings, "processor")
    loop.run_until_complete(
        ensure_topics(
            kafka,
            topic_plan(settings.partitions, settings.group_id),
            replication_factor=settings.replication_factor,
        )
    )
    datadir, _lock = claim_worker_dir(settings.data_dir / "processor")
    processor = create_app(settings, captioner, blobs, datadir, inference, kafka)
    # Before Faust opens the tables: state its changelog no longer backs (a restarted
    # in-memory broker, a recreated topic) is dropped and rebuilt instead of crashing.
    loop.run_until_complete(
        discard_stale_table_state(processor.app, settings.partitions, KafkaChangelogReader(kafka))
    )
    worker = faust.Worker(
        processor.app,
        loop=loop,
        loglevel=settings.log_level,
        # Faust replaces the root logger's handlers when it starts: with JSON logs, by
        # our JSON handler again (else by its own console format).
        logging_config=faust_logging_config(settings.log_level, settings.log_format),
        quiet=True,
    )
    worker.execute_from_commandline()
