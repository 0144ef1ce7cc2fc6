"""The `captionstream` command: run the broker, a worker, a gateway, or all of them; bulk-
ingest images straight to Kafka; print the captions topic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from captionstream.broker import EmbeddedBroker, die_with_parent, s3_env
from captionstream.errors import CaptionstreamError, ConfigurationError
from captionstream.kafka import KafkaConnection
from captionstream.kafka.acls import Acl
from captionstream.logging_config import configure_logging
from captionstream.settings import (
    EMBEDDED_BOOTSTRAP,
    BrokerKind,
    BrokerSettings,
    BulkIngestSettings,
    CommonSettings,
    GatewaySettings,
    KafkaProfile,
    ProcessingGuarantee,
    ProcessorSettings,
)

log = logging.getLogger("captionstream")


def _configure_logging() -> None:
    settings = CommonSettings()
    configure_logging(settings.log_level, settings.log_format)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


class LocalBroker(Protocol):
    """A broker `broker` / `up` run on this machine (embedded Tansu or Apache Kafka)."""

    @property
    def bootstrap(self) -> str: ...

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...


def embedded_broker(settings: BrokerSettings, port: int | None) -> EmbeddedBroker:
    """The embedded broker on EMBEDDED_BOOTSTRAP's host (`port` overrides its port), on
    the storage CAPTIONSTREAM_BROKER_STORAGE names."""
    host, _, default_port = EMBEDDED_BOOTSTRAP.rpartition(":")
    secret = settings.broker_s3_secret_access_key
    env = s3_env(
        endpoint=settings.broker_s3_endpoint,
        access_key_id=settings.broker_s3_access_key_id,
        secret_access_key=None if secret is None else secret.get_secret_value(),
        region=settings.broker_s3_region,
    )
    return EmbeddedBroker(
        host=host, port=port or int(default_port), storage=settings.broker_storage, env=env
    )


def start_local_broker(
    settings: BrokerSettings, kind: BrokerKind, port: int | None
) -> tuple[LocalBroker, KafkaProfile]:
    """Start the broker `kind` names; return it with the client profile it needs."""
    if kind is BrokerKind.APACHE:
        from captionstream.apache_kafka import ApacheKafkaCluster

        # Durable: topics and jobs survive a restart of `up` on the same data dir.
        cluster = ApacheKafkaCluster(settings.data_dir / "apache-kafka", nodes=1).start()
        return cluster, KafkaProfile.KAFKA
    return embedded_broker(settings, port).start(), KafkaProfile.EMBEDDED


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the local broker in the foreground until SIGINT/SIGTERM."""
    settings = BrokerSettings()
    if settings.kafka_bootstrap is not None:
        log.error(
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP=%s is set: using that Kafka, starting nothing",
            settings.kafka_bootstrap,
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)
    broker, profile = start_local_broker(settings, args.broker or settings.broker, args.port)
    try:
        log.info(
            "%s broker ready on %s (set CAPTIONSTREAM_KAFKA_BOOTSTRAP=%s and "
            "CAPTIONSTREAM_KAFKA_PROFILE=%s for the other components; Ctrl-C to stop)",
            args.broker or settings.broker,
            broker.bootstrap,
            broker.bootstrap,
            profile.value,
        )
        with contextlib.suppress(_Stop, KeyboardInterrupt):
            while broker.running:
                time.sleep(0.5)
            log.error("the broker exited")
            return 1
    finally:
        broker.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from captionstream.processor.worker import run_worker

    run_worker(ProcessorSettings())
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from captionstream.gateway.server import run_gateway

    run_gateway(GatewaySettings())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Broker (unless an external Kafka is configured), one worker and the gateway.

    Children are stopped on Ctrl-C/SIGTERM, or when any of them exits: no orphans.
    """
    settings = BrokerSettings()
    broker: LocalBroker | None = None
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, _raise_stop)
    # Ctrl-C stops the stack even where SIGINT came in ignored (a script's background
    # job): the worker and gateway install their own handlers and stop on it regardless,
    # and `up` must not take that for a component failing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    die_with_parent()  # `make run` may be killed without passing the signal on
    env = dict(os.environ)
    code = 0
    try:
        if settings.kafka_bootstrap is None:
            broker, profile = start_local_broker(
                settings, args.broker or settings.broker, args.broker_port
            )
            env["CAPTIONSTREAM_KAFKA_BOOTSTRAP"] = broker.bootstrap
            env["CAPTIONSTREAM_KAFKA_PROFILE"] = profile.value
        exe = [sys.executable, "-m", "captionstream"]
        for part in ("worker", "gateway"):
            children.append(subprocess.Popen([*exe, part], env=env, preexec_fn=die_with_parent))
        log.info("captionstream is up; Ctrl-C stops it")
        while all(child.poll() is None for child in children) and (
            broker is None or broker.running
        ):
            time.sleep(0.2)
        log.error("a component exited; stopping the rest")
        code = 1
    except (_Stop, KeyboardInterrupt):
        log.info("stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if broker is not None:
            broker.stop()
    return code


def cmd_topics(args: argparse.Namespace) -> int:
    """Print every topic the system uses and the ACLs each component needs; with
    `--create`, create the missing topics and check the existing ones."""
    from captionstream.kafka import ensure_topics, topic_plan
    from captionstream.kafka.acls import component_acls, grant, render_plan

    settings = ProcessorSettings()
    plan = topic_plan(settings.partitions, settings.group_id)
    # Exactly-once workers' transactional ids start with the group id (processor.transport).
    exactly_once = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    acls = component_acls(
        settings.group_id, GatewaySettings().webhook_group_id, transactional=exactly_once
    )
    print(render_plan(plan, settings.replication_factor, acls))
    grants = [grant_for(spec, acls) for spec in args.grant]  # bad specs fail before Kafka
    kafka = KafkaConnection.from_settings(settings, "admin")
    if args.create:
        created = asyncio.run(
            ensure_topics(kafka, plan, replication_factor=settings.replication_factor)
        )
        log.info(
            "created %s; every topic of the plan exists as planned",
            ", ".join(created) if created else "nothing",
        )
    for component, principal, wanted in grants:
        count = asyncio.run(grant(kafka, principal, wanted))
        log.info("granted %s the %d ACLs of the %s", principal, count, component)
    return 0


def grant_for(spec: str, acls: Mapping[str, list[Acl]]) -> tuple[str, str, list[Acl]]:
    """`COMPONENT=PRINCIPAL` (`processor=User:worker`) -> that component's ACLs."""
    component, _, principal = spec.partition("=")
    names = {name.split()[0]: name for name in acls}  # "downstream consumer (...)": "downstream"
    names["tail"] = names["downstream"]
    if component not in names or ":" not in principal:
        raise ConfigurationError(
            f"--grant {spec!r}: expected COMPONENT=PRINCIPAL, COMPONENT one of "
            f"{', '.join(sorted(names))} and PRINCIPAL like User:NAME"
        )
    return names[component], principal, acls[names[component]]


def cmd_ingest(args: argparse.Namespace) -> int:
    """Submit many images straight to Kafka; results as JSON lines in --out (resumable)."""
    from pydantic import ValidationError

    from captionstream.ingest.bulk import BulkIngestError, run_bulk_ingest
    from captionstream.schemas.events import GenerationOptions

    options = None
    if args.options_json is not None:
        try:
            options = GenerationOptions.model_validate_json(args.options_json)
        except ValidationError as exc:
            raise BulkIngestError(f"--options-json: {exc}") from exc
    summary = run_bulk_ingest(
        args.source,
        args.out,
        BulkIngestSettings(),
        options=options,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        progress={"auto": None, "on": True, "off": False}[args.progress],
    )
    log.info(
        "%s: %d SUCCESS, %d FAILURE, %d REJECTED this run; %d already done before",
        args.out,
        summary.success,
        summary.failure,
        summary.rejected,
        summary.skipped,
    )
    if summary.unfinished:
        log.warning(
            "%d submitted images have no result yet (listed in %s.pending); run the same "
            "command again to wait for them",
            summary.unfinished,
            args.out,
        )
    return summary.exit_code


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the captions topic as JSON lines on stdout."""
    from captionstream.tail import tail_captions

    settings = CommonSettings()
    try:
        asyncio.run(
            tail_captions(
                KafkaConnection.from_settings(settings, "tail"),
                sys.stdout,
                from_beginning=args.from_beginning,
                max_events=args.max,
            )
        )
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `captionstream tail | head`: the reader is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captionstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    kinds = [kind.value for kind in BrokerKind]
    broker = sub.add_parser(
        "broker", help="run a local Kafka broker: embedded (Tansu) or apache (Apache Kafka)"
    )
    broker.add_argument("--port", type=int, default=None, help="embedded broker only")
    broker.add_argument(
        "--broker", type=BrokerKind, choices=kinds, default=None, help="default: embedded"
    )
    broker.set_defaults(func=cmd_broker)
    sub.add_parser("worker", help="run one processor worker").set_defaults(func=cmd_worker)
    sub.add_parser("gateway", help="run the HTTP gateway").set_defaults(func=cmd_gateway)
    up = sub.add_parser("up", help="run broker + worker + gateway (what `make run` does)")
    up.add_argument("--broker-port", type=int, default=None, help="embedded broker only")
    up.add_argument(
        "--broker",
        type=BrokerKind,
        choices=kinds,
        default=None,
        help="the local broker when CAPTIONSTREAM_KAFKA_BOOTSTRAP is unset: embedded "
        "(default; Tansu, in memory) or apache (Apache Kafka 4.x, durable, needs Java 17)",
    )
    up.set_defaults(func=cmd_up)
    topics = sub.add_parser(
        "topics",
        help="print every topic and the ACLs each component needs; --create makes them",
    )
    topics.add_argument(
        "--create",
        action="store_true",
        help="create the missing topics (as an administrator) and check the existing ones",
    )
    topics.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="COMPONENT=PRINCIPAL",
        help="allow PRINCIPAL (e.g. User:worker) the ACLs listed for COMPONENT (gateway, "
        "processor, ingest, tail); repeatable; needs an administrator's connection",
    )
    topics.set_defaults(func=cmd_topics)
    ingest = sub.add_parser(
        "ingest",
        help="submit many images straight to Kafka and write the results as JSON lines",
        description="Submit a directory (recursive), one image, or a manifest (.txt: one "
        'path per line; .jsonl: {"path": ..., "options": {...}} per line) straight to '
        "Kafka, wait for the captions and append one JSON line per image to --out. "
        "Rerunning the same command skips images already in --out and waits for those "
        "submitted but unfinished (--out + .pending) instead of submitting them again.",
    )
    ingest.add_argument("source", type=Path, help="directory, image file, or manifest")
    ingest.add_argument("--out", type=Path, required=True, help="results (JSONL); the journal")
    ingest.add_argument(
        "--options-json",
        default=None,
        help="generation options for every image, e.g. '{\"max_new_tokens\": 20}'",
    )
    ingest.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="images submitted but not finished, at most (default: "
        "CAPTIONSTREAM_INGEST_CONCURRENCY or 64)",
    )
    ingest.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        help="seconds to wait for one image's result (default: "
        "CAPTIONSTREAM_INGEST_TIMEOUT_S or 600); late ones stay pending for a rerun",
    )
    ingest.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bars on stderr (auto: when stderr is a terminal)",
    )
    ingest.set_defaults(func=cmd_ingest)
    tail = sub.add_parser("tail", help="print the captions topic as JSON lines")
    tail.add_argument(
        "--from-beginning", action="store_true", help="from the start (default: new events)"
    )
    tail.add_argument("--max", type=_positive_int, default=None, help="exit after N events")
    tail.set_defaults(func=cmd_tail)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CaptionstreamError as exc:
        log.error("%s", exc.detail)
        return 1
