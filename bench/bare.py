"""Bare-model throughput: `BlipCaptioner.caption` in this process, no Kafka, no HTTP.

The same captioner class, loading path and preprocessing as the worker; only the
stream around it is missing. One warm-up batch per batch size (first calls pay for
kernel selection and allocation), then timed batches.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.stats import BarePoint, DecoderComparison
from bench.system import DISTURBED_CORES, CpuMeter, minor_faults, wait_for_quiet
from captionstream.processor.captioner import BlipCaptioner, GenerationDefaults
from captionstream.schemas.events import GenerationOptions

if TYPE_CHECKING:
    from PIL.Image import Image

Progress = Callable[[str], None]


def check_generated_length(captioner: BlipCaptioner, image: Image, new_tokens: int) -> None:
    """Fail loudly unless the model generates exactly `new_tokens` tokens per image."""
    import torch

    configured = captioner.model.text_decoder.generation_config.min_new_tokens
    if configured != new_tokens:
        raise RuntimeError(f"the model's min_new_tokens is {configured}, not {new_tokens}")
    inputs = captioner.processor(images=[image], return_tensors="pt").to(captioner.device)
    pixels = inputs["pixel_values"].to(captioner.model.dtype)
    with torch.inference_mode():
        ids = captioner.model.generate(pixel_values=pixels, max_new_tokens=new_tokens)
    generated = ids.shape[1] - 1  # BLIP returns the [DEC] start token too
    if generated != new_tokens:
        raise RuntimeError(f"the model generated {generated} tokens, not {new_tokens}")


def load(
    model_dir: Path,
    *,
    precision: str,
    device: str,
    new_tokens: int,
    prepack_weights: bool = True,
    vision_attention: str = "auto",
) -> BlipCaptioner:
    """The captioner as the worker loads it, unless told otherwise (greedy, one beam)."""
    return BlipCaptioner.load(
        str(model_dir),
        data_dir=model_dir.parent,
        device=device,
        precision=precision,
        defaults=GenerationDefaults(max_new_tokens=new_tokens, num_beams=1),
        prepack_weights=prepack_weights,
        vision_attention=vision_attention,
    )


def measure(
    model_dir: Path,
    *,
    precision: str,
    device: str,
    batch_sizes: Sequence[int],
    batches: int,
    warmup_batches: int,
    images: Sequence[Image],
    new_tokens: int,
    progress: Progress,
    retries: int = 0,
    quiet_threshold: float = DISTURBED_CORES,
    quiet_wait_s: float = 60,
) -> list[BarePoint]:
    """Bare points for one precision; a point measured while other processes used more
    than `quiet_threshold` cores is measured again (up to `retries` times, after waiting
    up to `quiet_wait_s` for quiet), keeping the least disturbed measurement."""

    def disturbed(point: BarePoint) -> bool:
        return point.other_cores is not None and point.other_cores > quiet_threshold

    captioner = load(model_dir, precision=precision, device=device, new_tokens=new_tokens)
    check_generated_length(captioner, images[0], new_tokens)
    pool = itertools.cycle(images)
    points: list[BarePoint] = []
    for size in batch_sizes:
        options = [GenerationOptions()] * size
        for i in range(warmup_batches):
            t0 = time.perf_counter()
            captioner.caption([next(pool) for _ in range(size)], options)
            progress(
                f"bare {precision} batch {size}: warm-up {i + 1}/{warmup_batches} "
                f"{time.perf_counter() - t0:.1f} s"
            )

        point = latest = _timed(captioner, pool, precision, size, batches, progress)
        for _ in range(retries):
            if not disturbed(latest):
                break
            progress(
                f"bare {precision} batch {size}: other processes used "
                f"{latest.other_cores:.2f} cores meanwhile; measuring again when quieter"
            )
            still = wait_for_quiet(quiet_threshold, timeout_s=quiet_wait_s, progress=progress)
            if still is not None and still > quiet_threshold:
                break  # measuring again now would be just as disturbed
            latest = _timed(captioner, pool, precision, size, batches, progress)
            if (latest.other_cores or 0.0) < (point.other_cores or 0.0):
                point = latest
        progress(f"bare {precision} batch {size}: {point.images_per_s:.2f} images/s")
        points.append(point)
    del captioner
    gc.collect()
    _free_accelerator_memory()
    return points


def _timed(
    captioner: BlipCaptioner,
    pool: Iterator[Image],
    precision: str,
    size: int,
    batches: int,
    progress: Progress,
) -> BarePoint:
    options = [GenerationOptions()] * size
    times: list[float] = []
    meter = CpuMeter()
    meter.start()
    faults = minor_faults()
    for i in range(batches):
        batch = [next(pool) for _ in range(size)]
        t0 = time.perf_counter()
        captions = captioner.caption(batch, options)
        times.append(time.perf_counter() - t0)
        assert len(captions) == size
        progress(
            f"bare {precision} batch {size}: batch {i + 1}/{batches} {times[-1]:.1f} s "
            f"({size / times[-1]:.2f} images/s)"
        )
    other = meter.stop()
    after = minor_faults()
    return BarePoint(
        precision,
        size,
        tuple(times),
        other_cores=other,
        page_faults=None if faults is None or after is None else after - faults,
        idle_cores=meter.idle_cores(),
        stolen_cores=meter.stolen_cores(),
    )


class BareBatches:
    """Bare batches one call at a time, to interleave with pipeline segments
    (`pipeline.measure`'s paired rounds). Loads the captioner on the first call and runs
    one untimed batch then; each call returns one timed batch's seconds. Runs on the
    calling thread: the bench process's torch work all stays on its main thread (see
    processor.inference for why one thread)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        precision: str,
        device: str,
        batch_size: int,
        images: Sequence[Image],
        new_tokens: int,
        progress: Progress,
    ) -> None:
        self.model_dir, self.precision, self.device = model_dir, precision, device
        self.batch_size, self.new_tokens, self.progress = batch_size, new_tokens, progress
        self._pool = itertools.cycle(images)
        self._options = [GenerationOptions()] * batch_size
        self._captioner: BlipCaptioner | None = None

    def _batch(self, captioner: BlipCaptioner) -> float:
        batch = [next(self._pool) for _ in range(self.batch_size)]
        t0 = time.perf_counter()
        captions = captioner.caption(batch, self._options)
        assert len(captions) == self.batch_size
        return time.perf_counter() - t0

    def __call__(self) -> float:
        if self._captioner is None:
            self._captioner = load(
                self.model_dir,
                precision=self.precision,
                device=self.device,
                new_tokens=self.new_tokens,
            )
            warm = self._batch(self._captioner)
            self.progress(f"bare {self.precision} batch {self.batch_size}: warm-up {warm:.1f} s")
        return self._batch(self._captioner)

    def close(self) -> None:
        self._captioner = None
        gc.collect()
        _free_accelerator_memory()


@dataclass(frozen=True)
class Variant:
    """One way of running `caption()`: the decoding loop, weights and vision attention."""

    name: str
    lean: bool
    prepack: bool
    attention: str  # "eager" | "sdpa"


def captioning_variants(device: str, precision: str) -> list[Variant]:
    """HF's own way first, then the worker's changes added one at a time; the last is what
    the worker runs here. A change that does nothing on this device and precision (packing
    off the CPU or where oneDNN cannot, fused attention where `auto` keeps eager) is left
    out."""
    from captionstream.processor.attention import VisionAttention, resolve_vision_attention
    from captionstream.processor.packing import packing_applies
    from captionstream.processor.precision import Precision

    dtype = Precision(precision).dtype
    packs = packing_applies(device, dtype)
    fused = resolve_vision_attention("auto", device, dtype) is VisionAttention.SDPA
    variants = [Variant("generate(), plain weights, eager attention", False, False, "eager")]
    parts = ["lean loop"]
    variants.append(Variant(", ".join(parts), True, False, "eager"))
    if packs:
        parts.append("packed weights")
        variants.append(Variant(", ".join(parts), True, True, "eager"))
    if fused:
        parts.append("fused vision attention")
        variants.append(Variant(", ".join(parts), True, packs, "sdpa"))
    worker = variants[-1]
    variants[-1] = Variant(worker.name + " (the worker)", True, worker.prepack, worker.attention)
    return variants


def compare_decoders(
    model_dir: Path,
    *,
    precision: str,
    device: str,
    batch_sizes: Sequence[int],
    rounds: int,
    images: Sequence[Image],
    new_tokens: int,
    progress: Progress,
) -> list[DecoderComparison]:
    """`caption()` of one batch by each of `captioning_variants` in turn, `rounds` times
    each per batch size (after one untimed round)."""
    variants = captioning_variants(device, precision)

    captioners = {
        (v.prepack, v.attention): load(
            model_dir,
            precision=precision,
            device=device,
            new_tokens=new_tokens,
            prepack_weights=v.prepack,
            vision_attention=v.attention,
        )
        for v in variants
    }
    pool = itertools.cycle(images)
    found: list[DecoderComparison] = []
    for size in batch_sizes:
        batch = [next(pool) for _ in range(size)]
        options = [GenerationOptions()] * size
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        captions: set[tuple[str, ...]] = set()
        for i in range(rounds + 1):
            for variant in variants:
                captioner = captioners[variant.prepack, variant.attention]
                captioner.lean_decoder = variant.lean
                t0 = time.perf_counter()
                captions.add(tuple(captioner.caption(batch, options)))
                if i:  # the first round warms every variant up
                    times[variant.name].append(time.perf_counter() - t0)
        comparison = DecoderComparison(
            precision,
            size,
            {name: tuple(t) for name, t in times.items()},
            identical=len(captions) == 1,
        )
        progress(
            f"decoding {precision} batch {size}: "
            + ", ".join(
                f"{name} {min(t):.2f} s ({comparison.speedup(name):.2f}x)"
                for name, t in times.items()
            )
            + f"; {'identical' if comparison.identical else 'DIFFERENT'} captions"
        )
        found.append(comparison)
    del captioners
    gc.collect()
    _free_accelerator_memory()
    return found


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
