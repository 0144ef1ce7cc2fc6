"""The benchmark's pure helpers (`make bench` itself is a measurement, not a test)."""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from bench.__main__ import build_parser, default_batch_wait
from bench.bare import Variant, captioning_variants
from bench.images import compare_decoding, synthetic_jpegs
from bench.model import bert_style_vocab
from bench.stats import (
    STAGES,
    BarePoint,
    DecoderComparison,
    JobTimes,
    LatencySummary,
    PairedRound,
    PipelineRun,
    PollingRun,
    Report,
    bare_table,
    best_point,
    group_batches,
    percentile,
    polling_table,
    ratios,
    stage_medians,
)
from bench.system import (
    CpuMeter,
    cpu_model_from_cpuinfo,
    machine_ticks_from_proc_stat,
    minor_faults,
    minor_faults_from_stat,
    process_ticks_from_stat,
    wait_for_quiet,
)
from captionstream.processor.captioner import BlipCaptioner
from captionstream.processor.tiny_blip import build_tiny_blip
from captionstream.schemas.events import GenerationOptions

# --- percentiles ------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1  # input order does not matter
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_the_standard_definition() -> None:
    values = [0.3, 5.1, 2.2, 9.9, 4.4, 4.4, 7.0, 1.5, 3.3, 8.8, 6.1]
    expected = statistics.quantiles(values, n=100, method="inclusive")  # numpy's "linear"
    for q in range(1, 100):
        assert percentile(values, q) == pytest.approx(expected[q - 1])


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], q)


def test_percentile_of_nothing() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_latency_summary() -> None:
    s = LatencySummary.of([3.0, 1.0, 2.0, 10.0])
    assert (s.count, s.mean, s.p50, s.max) == (4, 4.0, 2.5, 10.0)
    assert s.p50 <= s.p95 <= s.p99 <= s.max


# --- results, ratios, report --------------------------------------------------------------


def points() -> list[BarePoint]:
    return [
        BarePoint("fp32", 1, (1.0, 1.0)),  # 1.0 images/s
        BarePoint("fp32", 8, (8.0 / 1.2, 8.0 / 1.2)),  # 1.2
        BarePoint("bf16", 1, (0.5, 0.5), other_cores=0.01),  # 2.0
        BarePoint(
            "bf16",
            8,
            (2.0, 2.0),
            other_cores=0.6,
            page_faults=16_000,
            idle_cores=0.05,
            stolen_cores=0.01,
        ),  # 4.0: best
        BarePoint("bf16", 16, (5.0,)),  # 3.2
    ]


def pipeline_run() -> PipelineRun:
    return PipelineRun(
        precision="bf16",
        max_batch_size=8,
        max_batch_wait_s=0.1,
        in_flight=16,
        images=48,
        wall_s=16.0,  # 3.0 images/s
        latencies_s=(4.0, 5.0, 6.0),
        client_latencies_s=(4.1, 5.1, 6.1),
        idle_cores=0.04,
        stolen_cores=0.0,
    )


def test_bare_point() -> None:
    p = BarePoint("bf16", 8, (2.0, 3.0))
    assert (p.images, p.seconds, p.images_per_s) == (16, 5.0, 3.2)


def test_best_point() -> None:
    best = best_point(points())
    assert (best.precision, best.batch_size) == ("bf16", 8)


def test_ratios() -> None:
    found = {r.label: r.value for r in ratios(points(), pipeline_run())}
    assert found == {
        "best bare (bf16 batch 8) / fp32 one at a time": pytest.approx(4.0),
        "fp32: batched (batch 8) / one at a time": pytest.approx(1.2),
        "bf16: batched (batch 8) / one at a time": pytest.approx(2.0),
        "bf16 / fp32, both one at a time": pytest.approx(2.0),
        "pipeline / best bare (bf16 batch 8)": pytest.approx(0.75),
    }


def test_pipeline_is_also_compared_with_bare_measured_before_and_after_it() -> None:
    after = BarePoint("bf16", 8, (8 / 3.5, 8 / 3.5))  # 3.5 images/s: the machine slowed
    found = {r.label: r.value for r in ratios(points(), pipeline_run(), after)}
    assert found["pipeline / best bare (bf16 batch 8)"] == pytest.approx(0.75)
    again = "pipeline / best bare measured again after the pipeline (3.50 images/s)"
    assert found[again] == pytest.approx(3.0 / 3.5)
    bracket = "pipeline / mean of best bare before and after it (3.75 images/s)"
    assert found[bracket] == pytest.approx(0.8)
    report = Report("b", {}, {}, points(), pipeline_run(), bare_after=after).markdown()
    assert f"- {bracket}: **0.80x**" in report


def test_ratios_without_reference_or_pipeline() -> None:
    only_bf16 = [p for p in points() if p.precision == "bf16"]
    found = {r.label for r in ratios(only_bf16, None)}
    assert found == {"bf16: batched (batch 8) / one at a time"}
    assert ratios([], None) == []


def test_bare_table() -> None:
    lines = bare_table(points())
    assert lines[0].startswith("| precision | batch |")
    assert len(lines) == 2 + len(points())
    assert {line.count("|") for line in lines} == {lines[0].count("|")}  # aligned columns
    assert "| bf16 | 8 | 16 | 2.00 | **4.00** | 4.00x | 1,000 | 0.60 | 0.05 / 0.01 |" in lines
    assert "| fp32 | 1 | 2 | 1.00 | **1.00** | 1.00x | ? | ? | ? / ? |" in lines


def test_report_markdown() -> None:
    text = Report(
        "bench",
        {"CPU": "Test CPU"},
        {"new tokens per caption": "20"},
        points(),
        pipeline_run(),
        notes=["a note"],
    ).markdown()
    assert text.startswith("# bench\n")
    assert "- **CPU**: Test CPU" in text
    assert "| bf16 | 8 | 0.1 | 16 | 48 | 0 | **3.00** | 0.75x | ? | 0.04 / 0.00 |" in text
    assert "| submitted_at -> produced_at (event) | 5.00 | 5.00 | 5.90 | 5.98 | 6.00 |" in text
    assert "- pipeline / best bare (bf16 batch 8): **0.75x** (target: >= 0.9)" in text
    assert text.endswith("- a note\n")


def test_paired_rounds_compare_each_minute_with_itself() -> None:
    paired = [
        PairedRound(8, bare_s=2.0, images=16, pipeline_s=5.0),  # 4.0 vs 3.2 images/s
        PairedRound(8, bare_s=4.0, images=16, pipeline_s=4.0),  # 2.0 vs 4.0
        PairedRound(8, bare_s=2.0, images=16, pipeline_s=4.0),  # 4.0 vs 4.0
    ]
    assert [r.ratio for r in paired] == pytest.approx([0.8, 2.0, 1.0])
    text = Report("b", {}, {}, points(), pipeline_run(), paired=paired).markdown()
    assert "## Pipeline and bare, interleaved (same batch size)" in text
    assert "| 1 | 2.00 | 4.00 | 16 | 3.20 | **0.80x** |" in text
    assert "| 2 | 4.00 | 2.00 | 16 | 4.00 | **2.00x** |" in text
    median = "- pipeline / bare, interleaved (median of 3 rounds, 0.80-2.00x): **1.00x**"
    assert median in text
    assert "interleaved" not in Report("b", {}, {}, points(), pipeline_run()).markdown()


def test_report_without_pipeline_or_bare() -> None:
    bare_only = Report("b", {}, {}, points(), None).markdown()
    assert "Whole pipeline" not in bare_only
    pipeline_only = Report("b", {}, {}, [], pipeline_run()).markdown()
    assert "Bare model" not in pipeline_only
    assert "| bf16 | 8 | 0.1 | 16 | 48 | 0 | **3.00** |  | ? |" in pipeline_only


def test_decoder_comparison_section() -> None:
    same = DecoderComparison(
        "bf16", 8, {"generate()": (2.0, 2.4), "lean loop": (1.6, 1.8)}, identical=True
    )
    assert same.baseline == "generate()"
    assert same.speedup("lean loop") == pytest.approx(1.25)  # fastest of each: 2.0 / 1.6
    differs = DecoderComparison("bf16", 16, {"generate()": (4.0,), "lean": (4.0,)}, False)
    text = Report("b", {}, {}, points(), None, decoders=[same, differs]).markdown()
    assert "## Captioning variants" in text
    assert "| bf16 | 8 | generate() | 2 | 2.00 | 4.00 | **1.00x** | yes |" in text
    assert "| bf16 | 8 | lean loop | 2 | 1.60 | 5.00 | **1.25x** | yes |" in text
    assert "| bf16 | 16 | lean | 1 | 4.00 | 4.00 | **1.00x** | **NO** |" in text
    assert "Greedy decoding" not in Report("b", {}, {}, points(), None).markdown()


def test_default_batch_wait() -> None:
    assert default_batch_wait(None) == 0.05
    assert default_batch_wait(BarePoint("bf16", 8, (3.0, 3.0))) == 0.15  # 5% of a batch
    assert default_batch_wait(BarePoint("fp16", 8, (0.02,))) == 0.01  # floor
    assert default_batch_wait(BarePoint("fp32", 16, (20.0,))) == 0.25  # cap


def test_cli_defaults_and_quick() -> None:
    args = build_parser().parse_args([])
    assert args.batch_sizes is None  # 1,4,8,16 unless --quick
    assert args.precisions == ["fp32", "auto"]
    assert args.new_tokens == 20
    quick = build_parser().parse_args(["--quick", "--batch-sizes", "1,2", "--precisions", "bf16"])
    assert (quick.quick, quick.batch_sizes, quick.precisions) == (True, [1, 2], ["bf16"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--batch-sizes", "0,4"])
    env = build_parser().parse_args(["--worker-env", "A=1", "--worker-env", "B=x=y"]).worker_env
    assert dict(env) == {"A": "1", "B": "x=y"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--worker-env", "NOVALUE"])


# --- machine --------------------------------------------------------------------------------


def test_machine_ticks_from_proc_stat() -> None:
    text = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 50 2 25 500 10 1 1 3 0 0\nintr 1\n"
    ticks = machine_ticks_from_proc_stat(text)
    assert ticks.busy == 100 + 5 + 50 + 3 + 2
    assert ticks.idle == 1000 + 20
    assert ticks.stolen == 7
    assert machine_ticks_from_proc_stat("cpu  1 2 3 4 5 6 7\n").stolen == 0  # old kernels
    with pytest.raises(ValueError, match="cpu"):
        machine_ticks_from_proc_stat("intr 1\n")


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_cpu_meter_sees_idle_cores() -> None:
    meter = CpuMeter()
    meter.start()
    time.sleep(0.5)  # this process sleeps: its cores are idle unless others use them
    others = meter.stop()
    idle, stolen = meter.idle_cores(), meter.stolen_cores()
    assert idle is not None
    assert stolen is not None
    assert others is not None
    cores = os.cpu_count() or 1
    assert 0 <= idle <= cores + 0.1
    assert 0 <= stolen <= cores + 0.1
    # every core is busy with some process, idle, or stolen; time with ticks of slack
    assert idle + stolen + others == pytest.approx(cores, abs=0.2 * cores + 0.1)


def test_process_ticks_from_stat() -> None:
    # the command name may contain spaces and parentheses
    text = "1234 (python (bench) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 3 0"
    assert process_ticks_from_stat(text) == 250 + 40


def test_minor_faults_from_stat() -> None:
    text = "1234 (py (x)) S 1 1234 1234 0 -1 4194560 777 0 3 0 250 40 0 0 20 0 3 0"
    assert minor_faults_from_stat(text) == 777
    assert (minor_faults() or 0) > 0  # this process has touched memory


def test_process_table_in_the_report() -> None:
    run = PipelineRun(
        "bf16",
        8,
        0.1,
        16,
        10,
        5.0,
        (1.0,),
        (1.0,),
        cores=(("worker", 1.9, 20_000), ("gateway", 0.02, None)),
    )
    text = Report("b", {}, {}, [], run).markdown()
    assert "| process | CPU (cores, mean) | CPU s / image | page faults / image |" in text
    assert "| worker | 1.90 | 0.950 | 2,000 |" in text
    assert "| gateway | 0.02 | 0.010 | ? |" in text


def test_cpu_model_from_cpuinfo() -> None:
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t: fpu\n"
    assert cpu_model_from_cpuinfo(text) == "AMD EPYC 9R14"


# --- model and images -----------------------------------------------------------------------


def test_bert_style_vocab_has_blip_base_layout() -> None:
    vocab = bert_style_vocab(30524)
    assert len(vocab) == 30524
    assert sorted(vocab.values()) == list(range(30524))
    expected = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    assert expected.items() <= vocab.items()
    assert (vocab["[DEC]"], vocab["[ENC]"]) == (30522, 30523)  # BLIP's bos and [ENC]


def test_synthetic_jpegs() -> None:
    jpegs = synthetic_jpegs(3, size=(64, 48), seed=5)
    assert len(set(jpegs)) == 3
    assert jpegs == synthetic_jpegs(3, size=(64, 48), seed=5)  # deterministic
    with Image.open(io.BytesIO(jpegs[0])) as img:
        assert (img.format, img.size) == ("JPEG", (64, 48))


def test_compare_decoding_times_whole_and_drafted_photos(tmp_path: Path) -> None:
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(str(build_tiny_blip(tmp_path / "tiny")))
    image_processor = processor.image_processor
    compared = compare_decoding(image_processor, (384, 384), count=2, size=(1600, 1200), rounds=1)
    assert (compared.images, compared.size) == (2, (1600, 1200))
    assert compared.whole_s > 0
    assert compared.drafted_s > 0
    note = compared.note()
    assert "2 JPEG photos of 1600x1200" in note
    assert f"**{compared.speedup:.1f}x**" in note


def test_saved_generation_config_fixes_the_caption_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """min_new_tokens in generation_config.json reaches BLIP's text decoder.

    The benchmark model relies on it to generate exactly N tokens. The model is biased
    to end every caption at once, so only min_new_tokens can make it longer.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_dir = tmp_path / "fixed-length"
    shutil.copytree(build_tiny_blip(tmp_path / "tiny"), model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(min_new_tokens=7, max_new_tokens=7)
    config_path.write_text(json.dumps(config))

    captioner = BlipCaptioner.load(
        str(model_dir), data_dir=tmp_path, device="cpu", precision="fp32"
    )
    sep = captioner.model.config.text_config.sep_token_id
    with torch.no_grad():
        captioner.model.text_decoder.cls.predictions.bias[sep] = 1e4
    pixels = captioner.processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    with torch.inference_mode():
        ids = captioner.model.generate(**pixels, max_new_tokens=7)
    assert ids.shape[1] - 1 == 7  # [DEC] + exactly 7 new tokens
    [caption] = captioner.caption([Image.new("RGB", (32, 32))], [GenerationOptions()])
    assert isinstance(caption, str)


def test_group_batches() -> None:
    times = [10.0, 10.001, 10.002, 14.0, 14.001, 18.5]
    assert group_batches(times) == [(3, 10.0), (2, 14.0), (1, 18.5)]
    assert group_batches(list(reversed(times))) == group_batches(times)
    assert group_batches([]) == []


def test_pipeline_batch_interval_and_report_line() -> None:
    run = PipelineRun(
        precision="bf16",
        max_batch_size=8,
        max_batch_wait_s=0.1,
        in_flight=16,
        images=24,
        wall_s=10.0,
        latencies_s=(1.0,),
        client_latencies_s=(1.0,),
        batches=((8, 0.0), (8, 4.5), (8, 8.5)),
    )
    assert run.batch_interval_s == pytest.approx(4.25)
    text = Report("b", {}, {}, points(), run).markdown()
    assert (
        "Worker batches seen in the results: 3 (3x8); median time between batches 4.25 s "
        "(bare: 2.00 s per batch of 8)." in text
    )
    assert PipelineRun("bf16", 8, 0.1, 16, 8, 1.0, (1.0,), (1.0,)).batch_interval_s is None


def test_wait_for_quiet_returns_the_other_load() -> None:
    other = wait_for_quiet(100.0, timeout_s=0, window_s=0.05)  # any load counts as quiet
    assert other is None or other >= 0.0


def test_stage_medians() -> None:
    # two batches of two jobs: STARTED written 0.1 s apart, 1 s of captioning,
    # results written within 0.3 s, the next batch starting 0.05 s later
    jobs = [
        JobTimes(started=0.0, produced=1.1, finished=1.3),
        JobTimes(started=0.1, produced=1.1001, finished=1.4),
        JobTimes(started=1.45, produced=2.55, finished=2.8),
        JobTimes(started=1.55, produced=2.5501, finished=2.85),
    ]
    medians = stage_medians(jobs)
    assert list(medians) == list(STAGES)
    assert medians["STARTED writes"] == pytest.approx(0.1)
    assert medians["captioning (blob read, decode, model)"] == pytest.approx(1.0)
    assert medians["result writes"] == pytest.approx(0.3)
    assert medians["until the next batch starts"] == pytest.approx(0.05)
    assert stage_medians([]) == {}


def test_stages_in_the_report() -> None:
    run = PipelineRun("bf16", 8, 0.1, 16, 8, 1.0, (1.0,), (1.0,), stages=(("a", 0.75), ("b", 0.25)))
    text = Report("b", {}, {}, [], run).markdown()
    assert "| worker, per batch (median) | s | share |" in text
    assert "| a | 0.750 | 75% |" in text


@pytest.mark.parametrize(
    ("device", "precision", "can_pack", "expected"),
    [
        (
            "cpu",
            "fp32",
            True,
            [
                "lean loop",
                "lean loop, packed weights",
                "lean loop, packed weights, fused vision attention (the worker)",
            ],
        ),
        ("cpu", "fp32", False, ["lean loop", "lean loop, fused vision attention (the worker)"]),
        ("cpu", "bf16", True, ["lean loop", "lean loop, packed weights (the worker)"]),
        ("cpu", "bf16", False, ["lean loop (the worker)"]),
        ("cuda", "fp16", True, ["lean loop", "lean loop, fused vision attention (the worker)"]),
    ],
)
def test_captioning_variants_end_with_what_the_worker_runs(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    precision: str,
    can_pack: bool,
    expected: list[str],
) -> None:

    monkeypatch.setattr("captionstream.processor.packing.packing_supported", lambda *_: can_pack)
    variants = captioning_variants(device, precision)
    assert variants[0] == Variant(
        "generate(), plain weights, eager attention", False, False, "eager"
    )
    assert [v.name for v in variants[1:]] == expected
    worker = variants[-1]
    assert worker.lean
    assert worker.prepack is (device == "cpu" and can_pack)
    assert worker.prepack is any("packed weights" in v.name for v in variants)
    assert worker.attention == ("eager" if (device, precision) == ("cpu", "bf16") else "sdpa")


def test_polling_table_gives_rates_percentiles_and_the_ratio_to_bare() -> None:
    run = PollingRun(
        label="default",
        model="tiny-blip",
        clients=2,
        client_mode="every 20 ms",
        jobs=4,
        wall_s=2.0,
        latencies_s=(1.0, 2.0, 3.0, 4.0),
        requests=20,
        worker_env=(("OMP_WAIT_POLICY", "PASSIVE"),),
        cores=(("worker", 0.5), ("gateway", 0.25)),
    )
    assert run.jobs_per_s == 2.0
    assert run.requests_per_job == 5.0
    bare = BarePoint("fp32", 8, (4.0,))  # 2 images/s
    header, _rule, row = polling_table([run], bare)
    assert "/ bare b8" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "default (OMP_WAIT_POLICY=PASSIVE)"
    assert cells[4:8] == ["2.00", "2.50", "3.97", "5.0"]
    assert cells[8] == "worker 0.50, gateway 0.25"
    assert cells[9] == "1.00x"
