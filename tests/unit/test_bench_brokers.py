"""`python -m bench --broker`: which brokers a run measures, and a report of two brokers
side by side (the pipeline itself is a measurement, not a test)."""

from __future__ import annotations

import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from bench.__main__ import broker_summary, build_parser, choose_brokers, pipeline_notes
from bench.pipeline import BROKER_PROFILES, BROKER_TITLES, _signals_held, broker_pids
from bench.stats import (
    BarePoint,
    BrokerRun,
    PairedRound,
    PipelineRun,
    Report,
    broker_ratios,
    broker_table,
)
from captionstream.apache_kafka import ApacheKafkaCluster
from captionstream.broker import EmbeddedBroker
from captionstream.settings import BrokerKind, KafkaProfile

EMBEDDED, APACHE = BrokerKind.EMBEDDED, BrokerKind.APACHE

# --- --broker ----------------------------------------------------------------------------


def test_broker_option_parses_the_three_choices_and_defaults_to_none() -> None:
    assert build_parser().parse_args([]).broker is None
    for choice in ("embedded", "apache", "both"):
        assert build_parser().parse_args(["--broker", choice]).broker == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--broker", "redpanda"])


def never_asked() -> str | None:
    raise AssertionError("Apache Kafka's problem was asked for an embedded-only run")


def test_embedded_needs_no_java() -> None:
    assert choose_brokers("embedded", never_asked) == ([EMBEDDED], None)


def test_default_is_both_where_apache_kafka_runs() -> None:
    assert choose_brokers(None, lambda: None) == ([EMBEDDED, APACHE], None)
    assert choose_brokers("both", lambda: None) == ([EMBEDDED, APACHE], None)
    assert choose_brokers("apache", lambda: None) == ([APACHE], None)


def test_default_falls_back_to_embedded_and_says_why() -> None:
    brokers, skipped = choose_brokers(None, lambda: "no `java`")
    assert brokers == [EMBEDDED]
    assert skipped == "Apache Kafka skipped: no `java`"


@pytest.mark.parametrize("choice", ["apache", "both"])
def test_asking_for_apache_kafka_where_it_cannot_run_is_an_error(choice: str) -> None:
    with pytest.raises(ValueError, match=f"--broker {choice}: .*Java 11"):
        choose_brokers(choice, lambda: "java is Java 11")


def test_unknown_choice_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected one of embedded, apache, both"):
        choose_brokers("redpanda", lambda: None)


def test_each_broker_gets_the_client_profile_captionstream_up_gives_it() -> None:
    assert BROKER_PROFILES == {EMBEDDED: KafkaProfile.EMBEDDED, APACHE: KafkaProfile.KAFKA}
    assert set(BROKER_TITLES) == set(BrokerKind)


def test_broker_pids_come_from_public_accessors(tmp_path: Path) -> None:
    # Not started: no process, so nothing to measure.
    assert broker_pids(EmbeddedBroker(port=1)) == {}
    assert broker_pids(ApacheKafkaCluster(tmp_path)) == {}


def test_ctrl_c_and_sigterm_wait_while_the_stack_stops() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with _signals_held():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(RuntimeError), _signals_held():  # restored on an exception too
        raise RuntimeError
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_signals_are_left_alone_off_the_main_thread() -> None:
    seen: list[object] = []

    def stop_from_a_thread() -> None:
        with _signals_held():  # signal.signal() would raise ValueError here
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=stop_from_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGINT)]


def test_notes_name_the_brokers_measured() -> None:
    [single] = pipeline_notes([EMBEDDED], "2026 INFO worker: loaded model x")
    assert single.startswith("Pipeline: embedded broker (Tansu), one `python -m captionstream")
    assert single.endswith("Worker log: `loaded model x`")
    both = pipeline_notes([EMBEDDED, APACHE], "")
    assert len(both) == 2
    assert "one after the other (embedded broker (Tansu), then Apache Kafka" in both[0]
    assert both[1].startswith("Apache Kafka ")
    assert "`kafka` profile" in both[1]


# --- two brokers in the report -----------------------------------------------------------


def run(wall_s: float, latencies: tuple[float, ...], broker_cores: float) -> PipelineRun:
    return PipelineRun(
        precision="bf16",
        max_batch_size=8,
        max_batch_wait_s=0.1,
        in_flight=16,
        images=48,
        wall_s=wall_s,
        latencies_s=latencies,
        client_latencies_s=tuple(v + 0.1 for v in latencies),
        other_cores=0.02,
        batches=((8, 0.0), (8, 2.0), (8, 4.0)),  # 2 s between batches
        stages=(("STARTED writes", 0.01), ("result writes", 0.02)),
        cores=(("worker", 1.8, None), ("broker (x)", broker_cores, None)),
    )


def brokers() -> list[BrokerRun]:
    embedded = BrokerRun(
        "embedded",
        run(16.0, (4.0, 5.0, 6.0), 0.05),  # 3.0 images/s
        paired=(PairedRound(8, 2.0, 16, 5.0),),  # bare 4.0, pipeline 3.2: 0.8x
        bare_after=BarePoint("bf16", 8, (2.0,)),
        title="embedded broker (Tansu)",
    )
    apache = BrokerRun(
        "apache",
        replace(
            run(20.0, (5.0, 6.0, 9.0), 0.2),  # 2.4 images/s
            cores=(("worker", 1.8, None), ("broker (Apache Kafka)", 0.2, None)),
        ),
        paired=(PairedRound(8, 2.0, 16, 10.0),),  # pipeline 1.6: 0.4x
        bare_after=BarePoint("bf16", 8, (2.0,)),
        title="Apache Kafka 4.4.0 (one KRaft node)",
    )
    return [embedded, apache]


def test_broker_run_figures() -> None:
    embedded, apache = brokers()
    assert embedded.paired_ratio == pytest.approx(0.8)
    assert apache.broker_cores() == pytest.approx(0.2)  # whatever the broker is called
    assert apache.cores_of("worker") == pytest.approx(1.8)
    assert apache.cores_of("gateway") is None
    assert BrokerRun("x", run(1.0, (1.0,), 0.0)).heading == "x"


def test_broker_table_puts_brokers_side_by_side_with_ratios_to_the_first() -> None:
    lines = broker_table(brokers())
    assert lines[0] == "|  | embedded | apache | apache / embedded |"
    assert "| images/s | 3.00 | 2.40 | **0.80x** |" in lines
    assert "| pipeline / bare, interleaved (median) | 0.80 | 0.40 | **0.50x** |" in lines
    assert "| images timed (failed) | 48 (0) | 48 (0) |  |" in lines
    assert "| event latency p50 (s) | 5.00 | 6.00 | **1.20x** |" in lines
    assert "| event latency max (s) | 6.00 | 9.00 | **1.50x** |" in lines
    assert "| client latency p50 (s) | 5.10 | 6.10 | **1.20x** |" in lines
    assert "| median time between batches (s) | 2.00 | 2.00 | **1.00x** |" in lines
    assert "| worker per batch: result writes (s, median) | 0.020 | 0.020 | **1.00x** |" in lines
    assert "| broker CPU (cores) | 0.05 | 0.20 | **4.00x** |" in lines
    # cores x wall time / images: 0.05 * 16 / 48 and 0.2 * 20 / 48
    assert "| broker CPU s / image | 0.017 | 0.083 | **5.00x** |" in lines
    assert "| gateway CPU (cores) | ? | ? |  |" in lines


def test_broker_table_leaves_out_rounds_one_broker_lacks() -> None:
    embedded, apache = brokers()
    lines = broker_table([embedded, replace(apache, paired=())])
    assert not any("interleaved" in line for line in lines)


def test_broker_ratios() -> None:
    found = {r.label: r.value for r in broker_ratios(brokers())}
    assert found["apache / embedded, pipeline images/s"] == pytest.approx(0.8)
    drift_free = (
        "apache / embedded, pipeline / bare interleaved (each against its own bare batches)"
    )
    assert found[drift_free] == pytest.approx(0.5)
    assert found["apache / embedded, event latency p50"] == pytest.approx(1.2)
    assert found["apache / embedded, event latency p99"] == pytest.approx(8.94 / 5.98)


def test_report_of_two_brokers() -> None:
    points = [BarePoint("fp32", 1, (1.0,)), BarePoint("bf16", 8, (2.0, 2.0))]  # 1.0, 4.0
    text = Report("bench", {}, {}, points, None, brokers=brokers()).markdown()
    side_by_side = "## Whole pipeline on each broker (embedded and apache), side by side"
    embedded = "## Whole pipeline (HTTP upload -> caption event): embedded broker (Tansu)"
    apache = "## Whole pipeline (HTTP upload -> caption event): Apache Kafka 4.4.0 (one KRaft"
    for heading in (side_by_side, embedded, apache):
        assert heading in text
    assert text.index(side_by_side) < text.index(embedded) < text.index(apache)
    # each broker's own table, against the same best bare point
    assert "| bf16 | 8 | 0.1 | 16 | 48 | 0 | **3.00** | 0.75x |" in text
    assert "| bf16 | 8 | 0.1 | 16 | 48 | 0 | **2.40** | 0.60x |" in text
    assert "### Apache Kafka 4.4.0 (one KRaft node)\n\n| round |" in text
    assert "| 1 | 2.00 | 4.00 | 16 | 1.60 | **0.40x** |" in text
    # bare ratios once; pipeline ratios once per broker; then the brokers compared
    assert text.count("best bare (bf16 batch 8) / fp32 one at a time") == 1
    assert "- embedded: pipeline / best bare (bf16 batch 8): **0.75x**" in text
    assert "- apache: pipeline / best bare (bf16 batch 8): **0.60x**" in text
    assert "- apache: pipeline / bare, interleaved (median of 1 rounds, 0.40-0.40x): **0.40x**" in (
        text
    )
    assert "- apache / embedded, pipeline images/s: **0.80x**" in text


def test_a_single_broker_report_is_unchanged() -> None:
    embedded = brokers()[0]
    text = Report(
        "bench",
        {},
        {},
        [BarePoint("bf16", 8, (2.0,))],
        embedded.run,
        paired=embedded.paired,
        bare_after=embedded.bare_after,
    ).markdown()
    assert "\n## Whole pipeline (HTTP upload -> caption event)\n" in text
    assert "side by side" not in text
    assert "apache" not in text
    assert "- pipeline / best bare (bf16 batch 8): **0.75x**" in text


def test_a_report_has_one_pipeline_or_several_brokers() -> None:
    with pytest.raises(ValueError, match="not both"):
        Report("b", {}, {}, [], brokers()[0].run, brokers=brokers())


def test_progress_summary_compares_each_broker_with_the_first() -> None:
    [line] = broker_summary(brokers())
    assert line == (
        "apache / embedded: 2.40 / 3.00 images/s (0.80x), p50 6.00 / 5.00 s (1.20x), "
        "p99 8.94 / 5.98 s (1.49x), vs bare interleaved 0.40 / 0.80 (0.50x)"
    )
