"""Pure helpers of the benchmark: percentiles, results, ratios and the Markdown report.

Nothing here touches torch, Kafka or the clock, so it is unit-tested (tests/unit/test_bench.py).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

REFERENCE_PRECISION = "fp32"  # the reference service: fp32, one image at a time


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks.

    Same definition as numpy's default (`method="linear"`).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def clusters(times: Sequence[float], gap_s: float) -> list[list[int]]:
    """Indices of `times` grouped into runs whose neighbours are at most `gap_s` apart,
    in time order."""
    groups: list[list[int]] = []
    last: float | None = None
    for i in sorted(range(len(times)), key=lambda i: times[i]):
        if last is not None and times[i] - last <= gap_s:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = times[i]
    return groups


# The worker stamps a batch's caption events in one loop right after inference.
BATCH_GAP_S = 0.02


def group_batches(times: Sequence[float], gap_s: float = BATCH_GAP_S) -> list[tuple[int, float]]:
    """Recover the worker's batches from its events' `produced_at` times (seconds):
    (size, time of its first event) per batch, in time order."""
    return [(len(g), times[g[0]]) for g in clusters(times, gap_s)]


@dataclass(frozen=True)
class JobTimes:
    """When the worker did what for one job (epoch seconds, from its events)."""

    started: float  # STARTED state made (`started_at`), before it is written
    produced: float  # caption event made (`produced_at`), right after inference
    finished: float  # final state made (`finished_at`), after the caption was written


STAGES = (
    "STARTED writes",
    "captioning (blob read, decode, model)",
    "result writes",
    "until the next batch starts",
)


def stage_medians(jobs: Sequence[JobTimes], gap_s: float = BATCH_GAP_S) -> dict[str, float]:
    """Median seconds per batch spent in each of `STAGES` by the worker."""
    groups = clusters([j.produced for j in jobs], gap_s)
    spans = []
    for group in groups:
        batch = [jobs[i] for i in group]
        first_started = min(j.started for j in batch)
        last_started = max(j.started for j in batch)
        produced = min(j.produced for j in batch)
        finished = max(j.finished for j in batch)
        spans.append((first_started, last_started, produced, finished))
    values: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for n, (first_started, last_started, produced, finished) in enumerate(spans):
        values[STAGES[0]].append(last_started - first_started)
        values[STAGES[1]].append(produced - last_started)
        values[STAGES[2]].append(finished - produced)
        if n + 1 < len(spans):
            values[STAGES[3]].append(spans[n + 1][0] - finished)
    return {stage: percentile(v, 50) for stage, v in values.items() if v}


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencySummary:
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            p99=percentile(values, 99),
            max=max(values),
        )


@dataclass(frozen=True)
class BarePoint:
    """Captioning in-process (no Kafka, no HTTP): one precision and batch size."""

    precision: str
    batch_size: int
    batch_seconds: tuple[float, ...]  # wall time of each timed batch
    other_cores: float | None = None  # CPU used meanwhile by processes not ours, in cores
    page_faults: int | None = None  # minor page faults of this process while timed
    idle_cores: float | None = None  # machine cores idle meanwhile (CpuMeter.idle_cores)
    stolen_cores: float | None = None  # ... and taken by the hypervisor

    @property
    def images(self) -> int:
        return self.batch_size * len(self.batch_seconds)

    @property
    def seconds(self) -> float:
        return sum(self.batch_seconds)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class PipelineRun:
    """HTTP upload to caption event, through broker, worker and gateway processes."""

    precision: str
    max_batch_size: int
    max_batch_wait_s: float
    in_flight: int  # closed loop: each client waits for its caption before the next upload
    images: int
    wall_s: float  # first upload sent .. last caption event received, as the client saw it
    latencies_s: tuple[float, ...]  # per job: event submitted_at .. event produced_at
    client_latencies_s: tuple[float, ...]  # per job: upload sent .. caption event received
    failed: int = 0
    other_cores: float | None = None
    idle_cores: float | None = None
    stolen_cores: float | None = None
    batches: tuple[tuple[int, float], ...] = ()  # (size, produced_at) seen: `group_batches`
    stages: tuple[tuple[str, float], ...] = ()  # `stage_medians`, as (stage, seconds)
    # per process: (role, cores used on average, minor page faults) while timed
    cores: tuple[tuple[str, float, int | None], ...] = ()

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def batch_interval_s(self) -> float | None:
        """Median time from one batch's results to the next's: inference + overhead."""
        starts = [t for _, t in self.batches]
        if len(starts) < 2:
            return None
        return percentile([b - a for a, b in itertools.pairwise(starts)], 50)


@dataclass(frozen=True)
class PollingRun:
    """Clients that upload, then ask for the status until the job is finished, as the
    reference service's clients do; `client_mode` says how often they ask."""

    label: str  # the worker's set-up, e.g. "default"
    model: str
    clients: int
    client_mode: str  # "every 20 ms", "as Retry-After says", "?wait=60"
    jobs: int
    wall_s: float  # first upload .. last terminal status, as the clients saw it
    latencies_s: tuple[float, ...]  # per job: upload sent .. terminal status received
    requests: int  # HTTP requests the clients made (uploads and status queries)
    worker_env: tuple[tuple[str, str], ...] = ()
    # per process: (role, cores used on average) while timed
    cores: tuple[tuple[str, float], ...] = ()

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s

    @property
    def requests_per_job(self) -> float:
        return self.requests / self.jobs


def polling_table(runs: Sequence[PollingRun], bare: BarePoint | None = None) -> list[str]:
    """One row per run; with `bare`, the ratio of jobs/s to its images/s."""
    header = ["worker set-up", "model", "clients", "asking", "jobs/s", "p50 (s)", "p99 (s)"]
    header += ["requests/job", "cores used"]
    if bare is not None:
        header.append(f"/ bare b{bare.batch_size}")
    rows = []
    for run in runs:
        env = ", ".join(f"{k}={v}" for k, v in run.worker_env) or "-"
        row = [
            f"{run.label} ({env})",
            run.model,
            str(run.clients),
            run.client_mode,
            f"{run.jobs_per_s:.2f}",
            f"{percentile(run.latencies_s, 50):.2f}",
            f"{percentile(run.latencies_s, 99):.2f}",
            f"{run.requests_per_job:.1f}",
            ", ".join(f"{role} {cores:.2f}" for role, cores in run.cores),
        ]
        if bare is not None:
            row.append(f"{run.jobs_per_s / bare.images_per_s:.2f}x")
        rows.append(row)
    return _table(header, rows)


# Cores no thread wanted / cores the hypervisor took, on average while timed: on a CPU
# run both should be near 0; idle cores mean the model's threads waited on each other.
IDLE_HEADER = "idle / stolen (cores)"


@dataclass(frozen=True)
class PairedRound:
    """One bare batch (the worker idle), then a pipeline segment (this process idle), back
    to back: both see the same minute of the machine, whose speed drifts 10-30%."""

    batch_size: int
    bare_s: float  # one batch of `batch_size` in this process
    images: int  # captioned by the pipeline segment, a closed loop like the main run
    pipeline_s: float  # first upload .. last caption event of the segment

    @property
    def bare_images_per_s(self) -> float:
        return self.batch_size / self.bare_s

    @property
    def pipeline_images_per_s(self) -> float:
        return self.images / self.pipeline_s

    @property
    def ratio(self) -> float:
        return self.pipeline_images_per_s / self.bare_images_per_s


def paired_table(rounds: Sequence[PairedRound]) -> list[str]:
    header = [
        "round",
        "bare s / batch",
        "bare images/s",
        "pipeline images",
        "pipeline images/s",
        "pipeline / bare",
    ]
    rows = [
        [
            str(i),
            f"{r.bare_s:.2f}",
            f"{r.bare_images_per_s:.2f}",
            str(r.images),
            f"{r.pipeline_images_per_s:.2f}",
            f"**{r.ratio:.2f}x**",
        ]
        for i, r in enumerate(rounds, 1)
    ]
    return _table(header, rows)


def best_point(points: Iterable[BarePoint]) -> BarePoint:
    return max(points, key=lambda p: p.images_per_s)


def find_point(points: Iterable[BarePoint], precision: str, batch_size: int) -> BarePoint | None:
    for p in points:
        if p.precision == precision and p.batch_size == batch_size:
            return p
    return None


@dataclass(frozen=True)
class Ratio:
    label: str
    value: float
    note: str = ""


def ratios(
    points: Sequence[BarePoint],
    pipeline: PipelineRun | None,
    bare_after: BarePoint | None = None,
    paired: Sequence[PairedRound] = (),
) -> list[Ratio]:
    """The comparisons the issue asks for, for whatever points were measured.

    `bare_after` is the best bare point measured again after the pipeline run: this
    machine's speed drifts by ~10% between minutes, so the pipeline is also compared with
    the mean of the measurements before and after it (bracketing), next to the plain ratio.
    `paired` rounds compare the two minute by minute; their median ratio is the one least
    moved by drift.
    """
    out: list[Ratio] = []
    if not points:
        return out
    best = best_point(points)
    best_name = f"{best.precision} batch {best.batch_size}"
    reference = find_point(points, REFERENCE_PRECISION, 1)
    if reference is not None:
        out.append(
            Ratio(
                f"best bare ({best_name}) / fp32 one at a time",
                best.images_per_s / reference.images_per_s,
                "fp32 batch 1 is how the reference service captions",
            )
        )
    for precision in dict.fromkeys(p.precision for p in points):
        single = find_point(points, precision, 1)
        batched = [p for p in points if p.precision == precision and p.batch_size > 1]
        if single is not None and batched:
            top = best_point(batched)
            out.append(
                Ratio(
                    f"{precision}: batched (batch {top.batch_size}) / one at a time",
                    top.images_per_s / single.images_per_s,
                )
            )
    precisions = list(dict.fromkeys(p.precision for p in points))
    if reference is not None:
        for precision in precisions:
            if precision == REFERENCE_PRECISION:
                continue
            same = find_point(points, precision, 1)
            if same is not None:
                out.append(
                    Ratio(
                        f"{precision} / fp32, both one at a time",
                        same.images_per_s / reference.images_per_s,
                    )
                )
    if pipeline is not None:
        out.append(
            Ratio(
                f"pipeline / best bare ({best_name})",
                pipeline.images_per_s / best.images_per_s,
                "target: >= 0.9",
            )
        )
        if bare_after is not None:
            bracket = (best.images_per_s + bare_after.images_per_s) / 2
            out.append(
                Ratio(
                    f"pipeline / best bare measured again after the pipeline "
                    f"({bare_after.images_per_s:.2f} images/s)",
                    pipeline.images_per_s / bare_after.images_per_s,
                )
            )
            out.append(
                Ratio(
                    f"pipeline / mean of best bare before and after it ({bracket:.2f} images/s)",
                    pipeline.images_per_s / bracket,
                    "target: >= 0.9; brackets the pipeline against drift in machine speed",
                )
            )
    if paired:
        values = [r.ratio for r in paired]
        out.append(
            Ratio(
                f"pipeline / bare, interleaved (median of {len(values)} rounds, "
                f"{min(values):.2f}-{max(values):.2f}x)",
                percentile(values, 50),
                "target: >= 0.9; a bare batch and a pipeline segment in turn, "
                "so both see the same minute",
            )
        )
    return out


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _per_image(count: int | None, images: int) -> str:
    return "?" if count is None else f"{count / images:,.0f}"


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _idle(idle: float | None, stolen: float | None) -> str:
    return f"{_cores(idle)} / {_cores(stolen)}"


def bare_table(points: Sequence[BarePoint]) -> list[str]:
    reference = find_point(points, REFERENCE_PRECISION, 1)
    rows = []
    for p in points:
        vs_ref = "" if reference is None else f"{p.images_per_s / reference.images_per_s:.2f}x"
        rows.append(
            [
                p.precision,
                str(p.batch_size),
                str(p.images),
                f"{p.seconds / len(p.batch_seconds):.2f}",
                f"**{p.images_per_s:.2f}**",
                vs_ref,
                _per_image(p.page_faults, p.images),
                _cores(p.other_cores),
                _idle(p.idle_cores, p.stolen_cores),
            ]
        )
    header = [
        "precision",
        "batch",
        "images timed",
        "s / batch",
        "images/s",
        "vs fp32 batch 1",
        "page faults / image",
        "other load (cores)",
        IDLE_HEADER,
    ]
    return _table(header, rows)


def pipeline_table(run: PipelineRun, best: BarePoint | None) -> list[str]:
    event = LatencySummary.of(run.latencies_s)
    client = LatencySummary.of(run.client_latencies_s)
    vs_best = "" if best is None else f"{run.images_per_s / best.images_per_s:.2f}x"
    header = [
        "precision",
        "max batch",
        "batch wait (s)",
        "in flight",
        "images",
        "failed",
        "images/s",
        "vs best bare",
        "other load (cores)",
        IDLE_HEADER,
    ]
    row = [
        run.precision,
        str(run.max_batch_size),
        f"{run.max_batch_wait_s:g}",
        str(run.in_flight),
        str(run.images),
        str(run.failed),
        f"**{run.images_per_s:.2f}**",
        vs_best,
        _cores(run.other_cores),
        _idle(run.idle_cores, run.stolen_cores),
    ]
    lat_header = ["end-to-end latency (s)", "mean", "p50", "p95", "p99", "max"]
    lat_rows = [
        [
            name,
            *(f"{v:.2f}" for v in (s.mean, s.p50, s.p95, s.p99, s.max)),
        ]
        for name, s in (
            ("submitted_at -> produced_at (event)", event),
            ("upload sent -> caption event received (client)", client),
        )
    ]
    lines = [*_table(header, [row]), "", *_table(lat_header, lat_rows)]
    if run.batches:
        sizes = [size for size, _ in run.batches]
        counts = ", ".join(f"{n}x{size}" for size, n in sorted(Counter(sizes).items()))
        line = f"Worker batches seen in the results: {len(sizes)} ({counts})"
        interval = run.batch_interval_s
        if interval is not None:
            line += f"; median time between batches {interval:.2f} s"
            if best is not None and best.batch_size == run.max_batch_size:
                bare_batch = best.seconds / len(best.batch_seconds)
                line += f" (bare: {bare_batch:.2f} s per batch of {best.batch_size})"
        lines += ["", line + "."]
    if run.cores:
        lines += [
            "",
            *_table(
                ["process", "CPU (cores, mean)", "CPU s / image", "page faults / image"],
                [
                    [
                        name,
                        f"{cores:.2f}",
                        f"{cores * run.wall_s / run.images:.3f}",
                        _per_image(faults, run.images),
                    ]
                    for name, cores, faults in run.cores
                ],
            ),
        ]
    if run.stages:
        cycle = sum(seconds for _, seconds in run.stages)
        lines += [
            "",
            *_table(
                ["worker, per batch (median)", "s", "share"],
                [
                    [stage, f"{seconds:.3f}", f"{seconds / cycle:.0%}"]
                    for stage, seconds in run.stages
                ],
            ),
        ]
    return lines


@dataclass(frozen=True)
class BrokerRun:
    """The pipeline measured on one broker: its main run, its paired rounds, and the best
    bare point measured again right after it (from those rounds, or timed again)."""

    broker: str  # "embedded", "apache"
    run: PipelineRun
    paired: Sequence[PairedRound] = ()
    bare_after: BarePoint | None = None
    title: str = ""  # what the broker is, for headings; default `broker`

    @property
    def heading(self) -> str:
        return self.title or self.broker

    @property
    def paired_ratio(self) -> float | None:
        """Median pipeline / bare of the paired rounds: the figure least moved by drift."""
        return percentile([r.ratio for r in self.paired], 50) if self.paired else None

    def broker_cores(self) -> float | None:
        """Cores the broker's processes used on average while timed (None: not measured)."""
        found = [cores for name, cores, _ in self.run.cores if name.startswith("broker")]
        return sum(found) if found else None

    def cores_of(self, role: str) -> float | None:
        return next((cores for name, cores, _ in self.run.cores if name == role), None)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return ""
    return f"**{value / base:.2f}x**"


def _value(value: float | None, digits: int = 2) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


def broker_table(runs: Sequence[BrokerRun]) -> list[str]:
    """The same workload on each broker, side by side; the first broker is the baseline
    and every other gets a column of its value / the baseline's (throughput: higher is
    better; latency and CPU: lower is better)."""
    base, others = runs[0], runs[1:]
    header = ["", *(r.broker for r in runs), *(f"{r.broker} / {base.broker}" for r in others)]

    def row(label: str, values: Sequence[float | None], digits: int = 2) -> list[str]:
        cells = [_value(v, digits) for v in values]
        return [label, *cells, *(_ratio(v, values[0]) for v in values[1:])]

    def per_image(cores: float | None, run: PipelineRun) -> float | None:
        return None if cores is None else cores * run.wall_s / run.images

    events = [LatencySummary.of(r.run.latencies_s) for r in runs]
    clients = [LatencySummary.of(r.run.client_latencies_s) for r in runs]
    rows = [row("images/s", [r.run.images_per_s for r in runs])]
    if all(r.paired for r in runs):
        rows.append(row("pipeline / bare, interleaved (median)", [r.paired_ratio for r in runs]))
    images = [f"{r.run.images} ({r.run.failed})" for r in runs]
    rows.append(["images timed (failed)", *images, *("" for _ in others)])
    for name in ("mean", "p50", "p95", "p99", "max"):
        rows.append(row(f"event latency {name} (s)", [getattr(e, name) for e in events]))
    for name in ("p50", "p95", "p99"):
        rows.append(row(f"client latency {name} (s)", [getattr(c, name) for c in clients]))
    rows.append(row("median time between batches (s)", [r.run.batch_interval_s for r in runs]))
    stages = [dict(r.run.stages) for r in runs]
    for stage in STAGES:
        if any(stage in found for found in stages):
            label = f"worker per batch: {stage} (s, median)"
            rows.append(row(label, [found.get(stage) for found in stages], 3))
    rows += [
        row("broker CPU (cores)", [r.broker_cores() for r in runs]),
        row("broker CPU s / image", [per_image(r.broker_cores(), r.run) for r in runs], 3),
        row("worker CPU (cores)", [r.cores_of("worker") for r in runs]),
        row("gateway CPU (cores)", [r.cores_of("gateway") for r in runs]),
        row("other load (cores)", [r.run.other_cores for r in runs]),
    ]
    return _table(header, rows)


def broker_ratios(runs: Sequence[BrokerRun]) -> list[Ratio]:
    """Each broker after the first against the first: throughput, the drift-corrected
    interleaved figure, and latency percentiles."""
    out: list[Ratio] = []
    base = runs[0]
    for other in runs[1:]:
        name = f"{other.broker} / {base.broker}"
        out.append(
            Ratio(
                f"{name}, pipeline images/s",
                other.run.images_per_s / base.run.images_per_s,
                "one after the other: machine drift between the two runs counts too",
            )
        )
        if other.paired_ratio is not None and base.paired_ratio is not None:
            out.append(
                Ratio(
                    f"{name}, pipeline / bare interleaved (each against its own bare batches)",
                    other.paired_ratio / base.paired_ratio,
                    "drift-corrected: each broker's pipeline is compared with bare batches "
                    "timed in the same minutes",
                )
            )
        for q in (50, 95, 99):
            out.append(
                Ratio(
                    f"{name}, event latency p{q}",
                    percentile(other.run.latencies_s, q) / percentile(base.run.latencies_s, q),
                    "lower is better",
                )
            )
    return out


@dataclass(frozen=True)
class DecoderComparison:
    """The same batch captioned by each variant in turn (A, B, C, A, B, C, ...), so all
    see the same machine; the first variant is the baseline."""

    precision: str
    batch_size: int
    seconds: Mapping[str, tuple[float, ...]]  # variant -> seconds of each timed batch
    identical: bool  # the same captions from every variant, every time

    @property
    def baseline(self) -> str:
        return next(iter(self.seconds))

    def speedup(self, variant: str) -> float:
        """Baseline time / variant time, each the fastest of its batches (least disturbed)."""
        return min(self.seconds[self.baseline]) / min(self.seconds[variant])


def decoder_table(comparisons: Sequence[DecoderComparison]) -> list[str]:
    rows = [
        (
            c.precision,
            str(c.batch_size),
            variant,
            str(len(times)),
            f"{min(times):.2f}",
            f"{c.batch_size / min(times):.2f}",
            f"**{c.speedup(variant):.2f}x**",
            "yes" if c.identical else "**NO**",
        )
        for c in comparisons
        for variant, times in c.seconds.items()
    ]
    return _table(
        (
            "precision",
            "batch",
            "variant",
            "batches",
            "s / batch (fastest)",
            "images/s",
            "vs first variant",
            "identical captions",
        ),
        rows,
    )


@dataclass
class Report:
    title: str
    machine: Mapping[str, str]
    settings: Mapping[str, str]
    points: Sequence[BarePoint]
    pipeline: PipelineRun | None
    notes: list[str] = field(default_factory=list)
    decoders: Sequence[DecoderComparison] = ()
    bare_after: BarePoint | None = None  # the best bare point, again after the pipeline
    paired: Sequence[PairedRound] = ()
    # The pipeline on two or more brokers, compared with the first; instead of
    # `pipeline`, `bare_after` and `paired`, which describe a run on one broker.
    brokers: Sequence[BrokerRun] = ()

    def __post_init__(self) -> None:
        if self.brokers and (self.pipeline is not None or self.bare_after or self.paired):
            raise ValueError("a report has `brokers` or a single `pipeline`, not both")

    def _broker_sections(self) -> list[str]:
        best = best_point(self.points) if self.points else None
        names = " and ".join(b.broker for b in self.brokers)
        lines = ["", f"## Whole pipeline on each broker ({names}), side by side", ""]
        lines += broker_table(self.brokers)
        for b in self.brokers:
            lines += ["", f"## Whole pipeline (HTTP upload -> caption event): {b.heading}", ""]
            lines += pipeline_table(b.run, best)
        if any(b.paired for b in self.brokers):
            lines += ["", "## Pipeline and bare, interleaved (same batch size)"]
            for b in self.brokers:
                if b.paired:
                    lines += ["", f"### {b.heading}", "", *paired_table(b.paired)]
        return lines

    def _ratios(self) -> list[Ratio]:
        if not self.brokers:
            return ratios(self.points, self.pipeline, self.bare_after, self.paired)
        bare_only = ratios(self.points, None)
        found = list(bare_only)
        for b in self.brokers:
            found += [
                Ratio(f"{b.broker}: {r.label}", r.value, r.note)
                for r in ratios(self.points, b.run, b.bare_after, b.paired)
                if r not in bare_only
            ]
        return found + broker_ratios(self.brokers)

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [f"- **{key}**: {value}" for key, value in self.machine.items()]
        lines += ["", "## Settings", ""]
        lines += [f"- {key}: {value}" for key, value in self.settings.items()]
        if self.points:
            lines += ["", "## Bare model (in-process `BlipCaptioner.caption`, no Kafka)", ""]
            lines += bare_table(self.points)
        if self.decoders:
            lines += ["", "## Captioning variants (whole `caption()`, alternating)", ""]
            lines += decoder_table(self.decoders)
        if self.pipeline is not None:
            best = best_point(self.points) if self.points else None
            lines += ["", "## Whole pipeline (HTTP upload -> caption event)", ""]
            lines += pipeline_table(self.pipeline, best)
        if self.paired:
            lines += ["", "## Pipeline and bare, interleaved (same batch size)", ""]
            lines += paired_table(self.paired)
        if self.brokers:
            lines += self._broker_sections()
        found = self._ratios()
        if found:
            lines += ["", "## Ratios", ""]
            for r in found:
                note = f" ({r.note})" if r.note else ""
                lines.append(f"- {r.label}: **{r.value:.2f}x**{note}")
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"
