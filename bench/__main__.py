"""`make bench` / `python -m bench`: bare-model and whole-pipeline captioning speed.

1. Builds (once) the full-size BLIP-base architecture with random weights, fixed to
   generate exactly `--new-tokens` tokens, and saves it like a real model.
2. Bare model: images/s of `BlipCaptioner.caption` in this process at each batch size,
   in fp32 (the reference service's precision) and the reduced precision `auto` picks
   here (bf16 on CPUs with native bf16, fp16 on CUDA).
3. Pipeline: broker + worker + gateway processes, with the worker at the best bare
   precision and batch size; images uploaded over HTTP by a closed loop of clients,
   latency taken from each job's caption event. Then paired rounds: one bare batch in
   this process (the worker idle), one pipeline segment (this process idle), in turn,
   so the two are compared minute by minute on a machine whose speed drifts.
   `--broker both` (the default where Java 17+ runs; else the embedded broker alone,
   saying why) does all of this on the embedded broker, then again on Apache Kafka, and
   compares the two side by side; `--broker embedded|apache` picks one.
4. Prints the report and writes it to bench/RESULTS.md.

Run time, on 2 idle CPU cores (stated here only; the Makefile and the docs point here):
21.5 min for `--broker both` on the AVX2 AMD EPYC (fp32, bench/RESULTS.md), of which
Apache Kafka takes about 7 (`--broker embedded` saves them); 4.0 min on the AVX512-BF16
EPYC (bf16, embedded broker only). `make bench` then runs `python -m bench.polling` (the
stack under polling clients, tiny and full-size model, bench/RESULTS-polling.md): about
30 min in all on the AVX2 machine. Counts are small to keep it so; raise them with the
flags (`make bench BENCH_ARGS="--batches 4 --images 96"`), or `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import bare, pipeline
from bench.console import elapsed_s, progress, publish_report
from bench.images import compare_decoding, decode, synthetic_jpegs
from bench.model import NEW_TOKENS, build_bench_blip
from bench.pipeline import BROKER_TITLES
from bench.stats import (
    BarePoint,
    BrokerRun,
    DecoderComparison,
    Report,
    best_point,
    percentile,
)
from bench.system import DISTURBED_CORES, machine_description
from captionstream.settings import BrokerKind

ROOT = Path(__file__).resolve().parent

# Environment that changes how memory is allocated, and with it the speed (page faults).
ALLOCATOR_ENV = ("MALLOC_", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "OMP_", "KMP_")

MANY_FAULTS_PER_IMAGE = 10_000  # more: say that malloc is costing time

BROKER_CHOICES = ("embedded", "apache", "both")  # --broker


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,8: {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="batch sizes 1,8; 1 timed batch each; pipeline 2 batches (a smoke run, minutes)",
    )
    p.add_argument("--batch-sizes", type=_ints, default=None, help="default 1,4,8,16")
    p.add_argument("--batches", type=int, default=None, help="timed batches per point (2)")
    p.add_argument("--warmup-batches", type=int, default=1, help="per batch size (1)")
    p.add_argument(
        "--precisions",
        type=_names,
        default=["fp32", "auto"],
        help="bare precisions, `auto` resolved for the device (fp32,auto)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="exact caption length (20)")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="pipeline: timed images (default 6 x batch size; --quick 2 x)",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=None,
        help="pipeline: concurrent clients, each with one job in flight "
        "(default 2 x batch size: one batch computes while the next fills)",
    )
    p.add_argument(
        "--pipeline-batch-size",
        type=int,
        default=None,
        help="CAPTIONSTREAM_MAX_BATCH_SIZE (default: the best bare batch size)",
    )
    p.add_argument(
        "--pipeline-precision", default=None, help="default: the precision of the best bare point"
    )
    p.add_argument(
        "--max-batch-wait-s",
        type=float,
        default=None,
        help="CAPTIONSTREAM_MAX_BATCH_WAIT_S (default: 5%% of the best bare "
        "batch time, between 0.01 and 0.25 s)",
    )
    p.add_argument(
        "--paired-rounds",
        type=int,
        default=None,
        help="after the pipeline run, this many rounds of one bare batch then one pipeline "
        "segment of in-flight images, so both see the same minutes of a drifting machine "
        "(default 3; --quick 1; 0: measure bare again after the pipeline instead)",
    )
    p.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default=None,
        help="pipeline: the broker(s) to run it on; `both` runs the same workload on the "
        "embedded broker, then on Apache Kafka (one KRaft node), and reports them side by "
        "side (default: both where Java 17+ and the Kafka jars are usable, else embedded)",
    )
    p.add_argument("--no-bare", action="store_true", help="skip the bare-model points")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipeline run")
    p.add_argument(
        "--decoder-rounds",
        type=int,
        default=None,
        help="captioning variants (HF's generate() and eager attention, then the lean loop, "
        "packed weights and fused vision attention added in turn): timed batches of each, "
        "alternating, at the reduced precision and batch sizes >= 8 (default 2; --quick 1; "
        "0 skips it)",
    )
    p.add_argument(
        "--output",
        default=str(ROOT / "RESULTS.md"),
        help="where to write the report; '-' for nowhere (bench/RESULTS.md)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="model and run files (default $CAPTIONSTREAM_DATA_DIR/bench, else bench/.cache)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a bare point again when other processes used more than "
        f"{DISTURBED_CORES} cores meanwhile, up to this many times (2)",
    )
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=60,
        help="before a retry and before the pipeline run, wait up to this long "
        "for other processes to go quiet (60)",
    )
    p.add_argument(
        "--worker-env",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the pipeline's worker process (repeatable), "
        "e.g. MALLOC_ARENA_MAX=1",
    )
    p.add_argument("--keep", action="store_true", help="keep the pipeline run dir and logs")
    p.add_argument("--note", action="append", default=[], help="add a note to the report")
    return p


def apache_kafka_problem() -> str | None:
    """Why Apache Kafka cannot run here, or None once its jars are gathered (the first
    time: Maven downloads them, ~65 MB)."""
    from captionstream.apache_kafka import ensure_kafka_jars, java_problem
    from captionstream.errors import BrokerError

    problem = java_problem()
    if problem is not None:
        return problem
    try:
        ensure_kafka_jars()
    except BrokerError as exc:
        return str(exc)
    return None


def choose_brokers(
    choice: str | None, apache_problem: Callable[[], str | None]
) -> tuple[list[BrokerKind], str | None]:
    """The brokers to run the pipeline on, in order, and why Apache Kafka was left out
    of a default run (None: it was not).

    `choice` is `--broker`: None runs both where Apache Kafka can run here and the
    embedded broker alone otherwise; `apache` or `both` where it cannot is a ValueError.
    `apache_problem` says why it cannot (`apache_kafka_problem`); asked only if needed.
    """
    if choice is not None and choice not in BROKER_CHOICES:
        raise ValueError(f"--broker {choice}: expected one of {', '.join(BROKER_CHOICES)}")
    if choice == "embedded":
        return [BrokerKind.EMBEDDED], None
    problem = apache_problem()
    if problem is not None:
        if choice is not None:
            raise ValueError(f"--broker {choice}: Apache Kafka cannot run here: {problem}")
        return [BrokerKind.EMBEDDED], f"Apache Kafka skipped: {problem}"
    if choice == "apache":
        return [BrokerKind.APACHE], None
    return [BrokerKind.EMBEDDED, BrokerKind.APACHE], None


def broker_summary(runs: Sequence[BrokerRun]) -> list[str]:
    """One progress line per broker after the first: how it compares with the first."""
    base = runs[0]
    lines = []
    for other in runs[1:]:
        line = (
            f"{other.broker} / {base.broker}: {other.run.images_per_s:.2f} / "
            f"{base.run.images_per_s:.2f} images/s "
            f"({other.run.images_per_s / base.run.images_per_s:.2f}x)"
        )
        for q in (50, 99):
            mine, theirs = percentile(other.run.latencies_s, q), percentile(base.run.latencies_s, q)
            line += f", p{q} {mine:.2f} / {theirs:.2f} s ({mine / theirs:.2f}x)"
        if other.paired_ratio is not None and base.paired_ratio is not None:
            line += (
                f", vs bare interleaved {other.paired_ratio:.2f} / {base.paired_ratio:.2f} "
                f"({other.paired_ratio / base.paired_ratio:.2f}x)"
            )
        lines.append(line)
    return lines


def pipeline_notes(brokers: Sequence[BrokerKind], loaded: str) -> list[str]:
    """What the pipeline measurement is, for the report's notes."""
    worker_log = loaded.split(" ", 3)[-1] if loaded else "n/a"
    stack = (
        "one `python -m captionstream worker` and one gateway, all on this machine; a closed "
        "loop of async HTTP clients, each uploading an image and waiting for its caption "
        "event on `captionstream.captions.v1` before the next; images/s = timed images / "
        "wall time from the first upload to the last caption event."
    )
    if len(brokers) == 1:
        notes = [f"Pipeline: {BROKER_TITLES[brokers[0]]}, {stack} Worker log: `{worker_log}`"]
    else:
        titles = ", then ".join(BROKER_TITLES[kind] for kind in brokers)
        notes = [
            f"Pipeline: the same workload on each broker, one after the other ({titles}), "
            f"each on a fresh stack: the broker, {stack} Images, settings and paired rounds "
            "are the same on each. The images/s ratio between brokers includes the machine's "
            "drift between their runs; the interleaved one (each broker's pipeline / bare "
            "batches timed in the same minutes) does not. "
            f"Worker log: `{worker_log}`"
        ]
    if BrokerKind.APACHE in brokers:
        notes.append(
            f"{BROKER_TITLES[BrokerKind.APACHE]}: one combined broker+controller JVM as "
            "`captionstream up --broker apache` runs it (`captionstream/apache_kafka.py`: "
            "C1-only JIT, serial GC, 256 MB heap), replication factor 1; its clients use the "
            "`kafka` profile (production tuning), the embedded broker's the `embedded` one "
            "(docs/kafka.md)."
        )
    return notes


def default_batch_wait(best: BarePoint | None) -> float:
    """Long enough for a batch to fill under load, short next to the batch's own time."""
    if best is None:
        return 0.05
    per_batch = best.seconds / len(best.batch_seconds)
    return round(min(0.25, max(0.01, 0.05 * per_batch)), 3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the broker, worker and gateway are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    brokers: list[BrokerKind] = []
    skipped: str | None = None  # why Apache Kafka is left out of a default run
    if not args.no_pipeline:
        # Before the bare points: a missing Java or a failed jar download shows at once.
        try:
            brokers, skipped = choose_brokers(args.broker, apache_kafka_problem)
        except ValueError as exc:
            parser.error(str(exc))
        if skipped is not None:
            progress(f"broker: {skipped}; pass --broker apache to require it")
        progress("broker: " + ", then ".join(BROKER_TITLES[kind] for kind in brokers))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    # The worker's own malloc tuning, from the same settings (and environment, which the
    # worker inherits): bare and pipeline numbers are measured under the same allocator.
    from captionstream.processor.allocator import tune_malloc
    from captionstream.settings import ProcessorSettings

    worker_settings = ProcessorSettings()
    malloc = tune_malloc(
        worker_settings.malloc_tuning, keep_bytes=worker_settings.malloc_keep_bytes
    )
    import torch

    from captionstream.processor.captioner import select_device
    from captionstream.processor.precision import cpu_has_native_bf16, resolve_precision

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if threads:
        torch.set_num_threads(threads)  # what the worker does (processor.worker)
    device = select_device(args.device)
    cpu_bf16 = device.startswith("cpu") and cpu_has_native_bf16()

    def resolved(setting: str) -> str:
        return resolve_precision(setting, device, cpu_has_bf16=cpu_bf16).value

    precisions = list(dict.fromkeys(resolved(p) for p in args.precisions))
    batch_sizes = args.batch_sizes or ([1, 8] if args.quick else [1, 4, 8, 16])
    batches = args.batches or (1 if args.quick else 2)
    data_dir = os.environ.get("CAPTIONSTREAM_DATA_DIR")
    cache = args.cache_dir or (Path(data_dir) / "bench" if data_dir else ROOT / ".cache")
    cache.mkdir(parents=True, exist_ok=True)

    machine = machine_description(device)
    progress("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
    model_dir = cache / "models" / f"blip-base-random-{args.new_tokens}tok"
    progress(f"model: {model_dir} (building it if missing)")
    build_bench_blip(model_dir, new_tokens=args.new_tokens)

    jpegs = synthetic_jpegs(max(batch_sizes) + 8, seed=1)
    points: list[BarePoint] = []
    if not args.no_bare:
        images = [decode(j) for j in jpegs]
        per_precision = sum(b * (batches + args.warmup_batches) for b in batch_sizes)
        progress(
            f"bare: {precisions} x batch sizes {batch_sizes}: {args.warmup_batches} warm-up + "
            f"{batches} timed batches each ({per_precision} images per precision)"
        )
        for precision in precisions:
            points += bare.measure(
                model_dir,
                precision=precision,
                device=device,
                batch_sizes=batch_sizes,
                batches=batches,
                warmup_batches=args.warmup_batches,
                images=images,
                new_tokens=args.new_tokens,
                progress=progress,
                retries=args.retries,
                quiet_wait_s=args.quiet_wait_s,
            )

    decoders: list[DecoderComparison] = []
    decoder_rounds = (
        args.decoder_rounds if args.decoder_rounds is not None else (1 if args.quick else 2)
    )
    if decoder_rounds > 0 and not args.no_bare:
        reduced = resolved("auto")
        sizes = [b for b in batch_sizes if b >= 8] or [max(batch_sizes)]
        progress(f"captioning variants: {reduced}, batch sizes {sizes}")
        decoders = bare.compare_decoders(
            model_dir,
            precision=reduced,
            device=device,
            batch_sizes=sizes,
            rounds=decoder_rounds,
            images=[decode(j) for j in jpegs],
            new_tokens=args.new_tokens,
            progress=progress,
        )

    notes: list[str] = [
        "Model: the full-size BLIP-base architecture (`BlipConfig()` defaults, 224M "
        "parameters, 384x384 input) with random weights, saved with `save_pretrained` and "
        "loaded through the worker's own `from_pretrained` path; its generation config makes "
        f"every caption exactly {args.new_tokens} tokens. Speed does not depend on the "
        "weights' values. Images: synthetic 640x480 JPEGs.",
        "Bare: `BlipCaptioner.caption` in one process (preprocessing + vision encoder + "
        "greedy decoding + text decode, as the worker does it: lean loop, packed weights "
        "on CPU (bf16: all, fp32: the text decoder's), fused vision attention except on CPU "
        "bf16), one warm-up batch per "
        "batch size, then the timed batches.",
        "Captioning variants: the same batch captioned by `caption()` as HF ships BLIP "
        "(`generate()`, plain weights, eager attention), then with the worker's changes "
        "added one at a time: the lean loop (`processor/greedy.py`), oneDNN-packed weights "
        "(`processor/packing.py`, CPU only) and fused vision attention "
        "(`processor/attention.py`); the last row is what the worker runs here. In turn, "
        "after one untimed round; ratios of the fastest batch of each.",
    ]
    if not args.no_bare:
        from transformers import BlipProcessor

        from captionstream.processor.captioner import input_size_of

        image_processor = BlipProcessor.from_pretrained(str(model_dir)).image_processor
        input_size = input_size_of(image_processor)
        if input_size is not None:
            progress("decoding: photo-size JPEGs, whole vs drafted to the model's input size")
            compared = compare_decoding(image_processor, input_size, rounds=1 if args.quick else 2)
            progress(f"decoding: drafted {compared.speedup:.1f}x faster")
            notes.append(compared.note())
    best = best_point(points) if points else None
    broker_runs: list[BrokerRun] = []
    if not args.no_pipeline:
        size = args.pipeline_batch_size or (best.batch_size if best else 8)
        precision = args.pipeline_precision or (best.precision if best else resolved("auto"))
        precision = resolved(precision)
        wait = (
            args.max_batch_wait_s
            if args.max_batch_wait_s is not None
            else (default_batch_wait(best))
        )
        count = args.images or (2 if args.quick else 6) * size
        in_flight = args.in_flight or 2 * size
        warmup = synthetic_jpegs(in_flight, seed=2)  # the same load, untimed
        timed = synthetic_jpegs(count, seed=3)
        progress(
            f"pipeline: {precision}, max batch {size}, batch wait {wait} s, {in_flight} in "
            f"flight, {len(warmup)} warm-up + {count} timed images, on "
            + ", then ".join(BROKER_TITLES[kind] for kind in brokers)
        )
        same_as_best = best is not None and (best.precision, best.batch_size) == (precision, size)
        rounds = args.paired_rounds if args.paired_rounds is not None else (1 if args.quick else 3)
        pairing = None
        bare_batches = None
        if same_as_best and rounds > 0:
            bare_batches = bare.BareBatches(
                model_dir,
                precision=precision,
                device=device,
                batch_size=size,
                images=[decode(j) for j in jpegs],
                new_tokens=args.new_tokens,
                progress=progress,
            )
            segments = [synthetic_jpegs(in_flight, seed=10 + i) for i in range(rounds)]
            pairing = pipeline.Pairing(bare_batches, size, segments)
            progress(f"then {rounds} paired rounds: a bare batch, then {in_flight} images")
        loaded = ""
        try:
            for kind in brokers:  # the same images, settings and rounds on each broker
                run, paired, loaded = pipeline.measure(
                    model_dir=model_dir,
                    cache_dir=cache,
                    precision=precision,
                    device=device,
                    max_batch_size=size,
                    max_batch_wait_s=wait,
                    in_flight=in_flight,
                    warmup=warmup,
                    timed=timed,
                    new_tokens=args.new_tokens,
                    keep=args.keep,
                    progress=progress,
                    quiet_wait_s=args.quiet_wait_s,
                    worker_env=dict(args.worker_env),
                    pairing=pairing,
                    broker=kind,
                )
                progress(f"pipeline on the {BROKER_TITLES[kind]}: {run.images_per_s:.2f} images/s")
                bare_after: BarePoint | None = None
                if best is not None and paired:
                    # The paired rounds' bare batches: the best point measured after the pipeline.
                    bare_after = BarePoint(best.precision, size, tuple(r.bare_s for r in paired))
                elif best is not None and same_as_best:
                    progress(
                        f"bare: {best.precision} batch {best.batch_size} again, after the pipeline"
                    )
                    [bare_after] = bare.measure(
                        model_dir,
                        precision=best.precision,
                        device=device,
                        batch_sizes=[best.batch_size],
                        batches=batches,
                        warmup_batches=args.warmup_batches,
                        images=[decode(j) for j in jpegs],
                        new_tokens=args.new_tokens,
                        progress=progress,
                        retries=args.retries,
                        quiet_wait_s=args.quiet_wait_s,
                    )
                broker_runs.append(
                    BrokerRun(kind.value, run, tuple(paired), bare_after, BROKER_TITLES[kind])
                )
        finally:
            if bare_batches is not None:
                bare_batches.close()
        if len(broker_runs) > 1:
            for line in broker_summary(broker_runs):
                progress(line)
        notes += pipeline_notes(brokers, loaded)
    if skipped is not None:
        notes.append(f"Apache Kafka: not measured ({skipped}).")
    runs = [r.run for r in broker_runs]
    disturbed = [
        f"{p.precision} batch {p.batch_size} ({p.other_cores:.2f} cores)"
        for p in points
        if p.other_cores is not None and p.other_cores > DISTURBED_CORES
    ]
    for r in broker_runs:
        other = r.run.other_cores
        if other is not None and other > DISTURBED_CORES:
            where = f" on {r.broker}" if len(broker_runs) > 1 else ""
            disturbed.append(f"the pipeline run{where} ({other:.2f} cores)")
    if disturbed:
        notes.append(
            "**Disturbed**: other processes were using CPU during "
            + ", ".join(disturbed)
            + "; those numbers are lower than on an idle machine."
        )
    per_image = [p.page_faults / p.images for p in points if p.page_faults is not None]
    for run in runs:
        per_image += [f / run.images for _, _, f in run.cores if f is not None]
    faulting = max(per_image, default=0.0)
    if faulting > MANY_FAULTS_PER_IMAGE:
        notes.append(
            f"**Page faults**: up to {faulting:,.0f} minor page faults per image: glibc malloc "
            "gives the large activation buffers back to the kernel after each batch and "
            "faults them in again. That costs up to a quarter of the time and varies from "
            "run to run and between processes (bare vs worker), so compare ratios with care. "
            "The worker's malloc tuning (`CAPTIONSTREAM_MALLOC_TUNING`, on by default) "
            "removes them; it was off here: " + (malloc.skipped or "?")
        )
    notes.extend(args.note)

    given = shlex.join(argv if argv is not None else sys.argv[1:])
    settings = {
        "command": f"python -m bench {given}".strip(),
        "new tokens per caption": str(args.new_tokens),
        "torch threads": str(torch.get_num_threads()),
        "allocator environment (all processes)": " ".join(
            f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV)
        )
        or "none (glibc malloc defaults)",
        "malloc tuning (bench process and worker)": (
            " ".join(f"{k}={v}" for k, v in malloc.applied.items())
            if malloc.skipped is None
            else f"off ({malloc.skipped})"
        ),
        "extra worker environment": " ".join(f"{k}={v}" for k, v in args.worker_env) or "none",
        "run time": f"{elapsed_s() / 60:.1f} min",
    }
    if not args.no_pipeline:
        settings["broker"] = ", then ".join(BROKER_TITLES[kind] for kind in brokers)
        if skipped is not None:
            settings["broker"] += " (Apache Kafka skipped: see the notes)"
    single = broker_runs[0] if len(broker_runs) == 1 else None
    report = Report(
        "captionstream benchmark",
        machine,
        settings,
        points,
        None if single is None else single.run,
        notes,
        decoders=decoders,
        bare_after=None if single is None else single.bare_after,
        paired=() if single is None else single.paired,
        brokers=broker_runs if single is None else (),
    )
    publish_report(report.markdown(), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
