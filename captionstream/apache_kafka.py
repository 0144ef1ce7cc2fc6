"""A real Apache Kafka (KRaft) cluster as plain JVM processes, for tests and local runs.

Why not Docker or the Kafka tarball: these machines have neither, but they have Java 17,
Maven and Maven Central. So `ensure_kafka_jars` gathers the broker's jars once with the POM
shipped beside this module (`apache-kafka.pom.xml`), and `ApacheKafkaCluster` formats and
runs one combined broker+controller JVM per node on free loopback ports.

Start-up is tuned for small shared machines (2 cores), by measurement: C1-only JIT halves
the time to "Kafka Server started" (6-8 s with Kafka's own G1/C2 flags, 3-4 s), an AppCDS
archive of Kafka's classes takes a third off that (one node: ~2.8 s; three on two cores:
~8 s, plus ~2.5 s to format them the first time), and a 256 MB heap, a 16 MiB cleaner
buffer and smaller thread pools keep each JVM at 160-180 MB resident (vs 340-370 MB).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from captionstream.broker import child_preexec, free_port, port_open
from captionstream.errors import BrokerError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
POM_PATH = Path(__file__).with_name("apache-kafka.pom.xml")
JARS_ENV = "CAPTIONSTREAM_APACHE_KAFKA_JARS"
JAVA_MIN_MAJOR = 17  # Kafka 4.x brokers need Java 17
MAVEN_TIMEOUT_S = 900.0
# What the first gathering costs (measured with an empty ~/.m2): the jars themselves and
# what Maven downloads besides them (POMs, the dependency plugin and its own dependencies).
FIRST_DOWNLOAD_MB = 65
LIBS_MB = 43
READY_LINE = "Kafka Server started"
STAMP_FILE = ".pom-sha256"  # written last into a complete jar folder

T = TypeVar("T")


# --- Java and the jars ---------------------------------------------------------------


def java_executable() -> str | None:
    """`$JAVA_HOME/bin/java` where set (as Kafka's own scripts do), else `java` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def java_major_version(java: str) -> int | None:
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # `openjdk version "17.0.15"`, `java version "1.8.0_392"`, `openjdk version "25"`
    match = re.search(r'version "(?:1\.)?(\d+)', done.stderr + done.stdout)
    return int(match.group(1)) if match else None


def default_jars_dir() -> Path:
    """Where the jars are gathered unless told otherwise: versioned, per user."""
    if os.environ.get(JARS_ENV):
        return Path(os.environ[JARS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "captionstream" / f"apache-kafka-{KAFKA_VERSION}" / "libs"


def pom_digest() -> str:
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def jars_complete(libs: Path) -> bool:
    """True when `libs` was gathered to the end from the POM as it is now."""
    stamp = libs / STAMP_FILE
    return stamp.is_file() and stamp.read_text().strip() == pom_digest()


def java_problem(jars_dir: Path | None = None) -> str | None:
    """Why Apache Kafka cannot run here (no Java 17+, or no Maven and no gathered jars), or None."""
    java = java_executable()
    if java is None:
        return (
            f"no `java`: Apache Kafka {KAFKA_VERSION} needs a Java {JAVA_MIN_MAJOR}+ runtime "
            "(set JAVA_HOME, or apt-get install openjdk-17-jre-headless)"
        )
    major = java_major_version(java)
    if major is None or major < JAVA_MIN_MAJOR:
        return (
            f"{java} is Java {major or '?'}; Apache Kafka {KAFKA_VERSION} needs {JAVA_MIN_MAJOR}+"
        )
    if not jars_complete(jars_dir or default_jars_dir()) and shutil.which("mvn") is None:
        return (
            "no `mvn`: Maven gathers Apache Kafka's jars from Maven Central "
            f"(apt-get install maven, or point {JARS_ENV} at a gathered folder)"
        )
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, so concurrent test sessions gather the jars once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_kafka_jars(cache_dir: Path | None = None) -> Path:
    """The folder of Apache Kafka's runtime jars, gathered with Maven the first time.

    `cache_dir` (else env CAPTIONSTREAM_APACHE_KAFKA_JARS, else
    ~/.cache/captionstream/apache-kafka-VERSION/libs) is the folder itself. Maven writes
    into a temporary sibling that is renamed into place only once complete, under a file
    lock, so a killed or concurrent run never leaves a half folder that looks done.
    """
    libs = cache_dir or default_jars_dir()
    if jars_complete(libs):
        return libs
    with _file_lock(libs.parent / f".{libs.name}.lock"):
        if jars_complete(libs):  # another process gathered them while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(java_problem(libs) or "no `mvn` on PATH")
        staging = libs.parent / f".{libs.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "gathering Apache Kafka %s jars with Maven into %s (first time: about %d MB "
            "from Maven Central into ~/.m2, %d MB of jars; later runs reuse ~/.m2)",
            KAFKA_VERSION,
            libs,
            FIRST_DOWNLOAD_MB,
            LIBS_MB,
        )
        started = time.monotonic()
        cmd = [mvn, "-q", "-B", "-f", str(POM_PATH), "package", f"-Dkafka.libs={staging}"]
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=MAVEN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BrokerError(f"Maven did not finish in {MAVEN_TIMEOUT_S:.0f}s: {cmd}") from exc
        if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
            raise BrokerError(f"Maven failed ({done.returncode}) gathering Kafka jars:\n{tail}")
        (staging / STAMP_FILE).write_text(pom_digest() + "\n")
        if libs.exists():  # gathered from an older POM: set it aside, then drop it
            stale = libs.parent / f".{libs.name}.stale-{os.getpid()}"
            libs.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging.rename(libs)
        log.info("Kafka jars ready in %s (%.1fs)", libs, time.monotonic() - started)
        return libs


# --- the cluster ---------------------------------------------------------------------

LOG4J2_PROPERTIES = """\
# Written by captionstream.apache_kafka: INFO to stdout (the node's kafka.log), less noise.
status = warn
# log4j's own shutdown hook would stop logging while Kafka's hook is still shutting down
shutdownHook = disable
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
# the ~500-line config dump at every start
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""

# Properties every node gets, before the per-size ones and the caller's overrides.
COMMON_PROPERTIES: dict[str, str] = {
    # the project creates its topics explicitly; a typo must fail, not create a topic
    "auto.create.topics.enable": "false",
    "group.initial.rebalance.delay.ms": "0",  # default 3000: every first join waits 3 s
    # default 6000: consumer-group sessions as short as the embedded profile's 4 s (and
    # the tests' fault timings) are allowed
    "group.min.session.timeout.ms": "1000",
    # A SIGKILLed broker is fenced (its leaderships move) after the session timeout
    # (default 9000 ms, heartbeat 2000 ms).
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
    # Compaction within seconds: the cleaner looks for work every 0.5 s (default 15 s);
    # topics still need small `segment.ms` / `min.cleanable.dirty.ratio` to be cleanable.
    "log.cleaner.backoff.ms": "500",
    # default 128 MiB, allocated on the heap at start-up: half of a test heap
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
    # Internal topics default to 50 partitions each, whose files and leaders every node
    # creates at the first group or transaction; tests need far fewer.
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.num.partitions": "10",
    "share.coordinator.state.topic.num.partitions": "10",
    # thread pools sized for a 2-core machine running several JVMs (defaults 3/8/10)
    "num.network.threads": "2",
    "num.io.threads": "4",
    "background.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "group.coordinator.threads": "1",
}


def replication_properties(nodes: int) -> dict[str, str]:
    """1 node: everything RF 1. More: RF min(3, n) and min.insync.replicas min(2, n)."""
    factor = str(min(3, nodes))
    min_isr = str(min(2, nodes))
    return {
        "default.replication.factor": factor,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": factor,
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": min_isr,
        "unclean.leader.election.enable": "false",
    }


def new_cluster_id() -> str:
    """What `StorageTool random-uuid` prints, without starting a JVM for it."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


@dataclass(frozen=True, slots=True)
class NodePorts:
    client: int
    controller: int
    listeners: Mapping[str, int] = field(default_factory=dict)  # extra listener -> port


@dataclass(frozen=True, slots=True)
class Listener:
    """A client listener beside PLAINTEXT, e.g. SASL_SSL or mutual TLS.

    PLAINTEXT stays: brokers replicate over it and the launcher checks readiness on it,
    so a secured listener under test is reached only by the clients pointed at it.
    `properties` are that listener's own settings, written as
    `listener.name.<name>.<key>` (e.g. `ssl.keystore.location`, `sasl.enabled.mechanisms`).
    """

    name: str  # upper case, e.g. "SASL_SSL" or "MTLS"
    protocol: str  # SSL, SASL_SSL or SASL_PLAINTEXT
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScramCredential:
    """A SCRAM user written into the metadata log when the storage is formatted."""

    name: str
    password: str
    mechanism: str = "SCRAM-SHA-512"

    def format_option(self) -> list[str]:
        return ["--add-scram", f"{self.mechanism}=[name={self.name},password={self.password}]"]


class ApacheKafkaCluster:
    """`nodes` combined broker+controller JVMs under `root`, on `host` (loopback).

    Node ids are 1..nodes, as Kafka's `node.id` (what metadata reports as a leader).
    Under `root`: `cluster.json` (cluster id and ports, so a cluster started again on the
    same root keeps its data and its ports), `log4j2.properties`, and per node
    `node-N/server.properties`, `node-N/data/`, `node-N/kafka.log`.

    One node forms a dynamic quorum (`--standalone`, `controller.quorum.bootstrap.servers`);
    more use static `controller.quorum.voters`. `properties` override every default here.
    Each JVM dies with the thread that started it (PR_SET_PDEATHSIG), so start nodes from
    a thread that outlives them (the main thread; not `asyncio.to_thread`).
    """

    def __init__(
        self,
        root: Path,
        nodes: int = 1,
        host: str = "127.0.0.1",
        heap_mb: int = 256,
        properties: Mapping[str, str] | None = None,
        jars_dir: Path | None = None,
        listeners: Sequence[Listener] = (),
        scram_credentials: Sequence[ScramCredential] = (),
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, not {nodes}")
        self.root = root
        self.nodes = nodes
        self.host = host
        self.heap_mb = heap_mb
        self.properties = dict(properties or {})
        self.jars_dir = jars_dir
        self.listeners = tuple(listeners)
        self.scram_credentials = tuple(scram_credentials)
        self._libs: Path | None = None
        self._cluster_id = ""
        self._ports: dict[int, NodePorts] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[int, int] = {}
        self._dumping: tuple[int, Path] | None = None  # (node id, archive it writes at exit)

    # -- what clients need

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    @property
    def bootstrap(self) -> str:
        """Every node's client listener, comma-separated (valid once started)."""
        return ",".join(f"{self.host}:{self._ports[i].client}" for i in self.node_ids)

    def bootstrap_of(self, listener: str) -> str:
        """Every node's port of the extra listener named `listener`."""
        return ",".join(f"{self.host}:{self._ports[i].listeners[listener]}" for i in self.node_ids)

    def address(self, node_id: int) -> str:
        return f"{self.host}:{self._ports[node_id].client}"

    @property
    def pids(self) -> dict[int, int]:
        """Node id -> pid of each node JVM that is running now."""
        return {i: p.pid for i, p in self._procs.items() if p.poll() is None}

    @property
    def running(self) -> bool:
        """Whether every node's JVM is running."""
        return len(self.pids) == self.nodes

    def node_dir(self, node_id: int) -> Path:
        return self.root / f"node-{node_id}"

    def log_file(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "kafka.log"

    # -- lifecycle

    def start(self, timeout_s: float = 180.0) -> ApacheKafkaCluster:
        """Format what is new, start every node, return once all serve clients."""
        deadline = time.monotonic() + timeout_s
        self._libs = ensure_kafka_jars(self.jars_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._load_or_create_layout()
        (self.root / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        for node_id in self.node_ids:
            self._write_server_properties(node_id)
        self._format_storage(deadline)
        started = time.monotonic()
        try:
            for node_id in self.node_ids:
                self._launch(node_id)
            self._wait_ready(self.node_ids, deadline)
        except BaseException:
            self.stop()
            raise
        log.info(
            "Apache Kafka %s: %d node(s) serving on %s after %.1fs",
            KAFKA_VERSION,
            self.nodes,
            self.bootstrap,
            time.monotonic() - started,
        )
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every node at once (controlled shutdown), SIGKILL what is left after
        `timeout_s`; returns when no node JVM is left.

        With 3+ nodes this takes ~5.5 s: the last quorum leader waits out Kafka's fixed 5 s
        for a successor (KafkaRaftClientDriver) before it exits.
        """
        procs = [p for p in self._procs.values() if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        _wait_or_kill(procs, timeout_s)
        for node_id, proc in self._procs.items():
            self._adopt_class_archive(node_id, proc)
        self._procs.clear()

    def stop_node(self, node_id: int, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Stop one node with `sig` (SIGKILL for a crash), SIGKILL after `timeout_s`."""
        proc = self._procs.pop(node_id, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        _wait_or_kill([proc], timeout_s)
        self._adopt_class_archive(node_id, proc)

    def start_node(self, node_id: int, timeout_s: float = 120.0) -> None:
        """Start a stopped node again on its ports and data; returns once it serves
        clients and the cluster's metadata lists it again (it has rejoined)."""
        if node_id in self.pids:
            raise BrokerError(f"node {node_id} is already running (pid {self.pids[node_id]})")
        self._launch(node_id)
        self._wait_ready([node_id], time.monotonic() + timeout_s)

    # -- internals

    def _load_or_create_layout(self) -> None:
        """Cluster id and ports: read from root/cluster.json, or chosen and stored there."""
        layout_file = self.root / "cluster.json"
        if layout_file.exists():
            layout: dict[str, Any] = json.loads(layout_file.read_text())
            if len(layout["nodes"]) != self.nodes:
                raise BrokerError(
                    f"{self.root} holds a {len(layout['nodes'])}-node cluster, not {self.nodes}"
                )
            self._cluster_id = layout["cluster_id"]
            self._ports = {
                int(i): NodePorts(p["client"], p["controller"], p.get("listeners", {}))
                for i, p in layout["nodes"].items()
            }
            wanted = {listener.name for listener in self.listeners}
            if all(set(p.listeners) == wanted for p in self._ports.values()):
                return
        else:
            self._cluster_id = new_cluster_id()
        taken = {port for p in self._ports.values() for port in (p.client, p.controller)}
        for node_id in self.node_ids:
            if node_id in self._ports:  # a known node: keep its ports, add new listeners
                client, controller = self._ports[node_id].client, self._ports[node_id].controller
            else:
                client, controller = _distinct_free_ports(self.host, taken, 2)
            ports = _distinct_free_ports(self.host, taken, len(self.listeners))
            extra = {
                listener.name: port for listener, port in zip(self.listeners, ports, strict=True)
            }
            self._ports[node_id] = NodePorts(client, controller, extra)
        layout = {
            "kafka_version": KAFKA_VERSION,
            "cluster_id": self._cluster_id,
            "nodes": {
                str(i): {"client": p.client, "controller": p.controller, "listeners": p.listeners}
                for i, p in self._ports.items()
            },
        }
        layout_file.write_text(json.dumps(layout, indent=2) + "\n")

    def server_properties(self, node_id: int) -> dict[str, str]:
        ports = self._ports[node_id]
        node_dir = self.node_dir(node_id)
        extra = [(x, ports.listeners[x.name]) for x in self.listeners]
        advertised = [f"PLAINTEXT://{self.host}:{ports.client}"]
        advertised += [f"{x.name}://{self.host}:{port}" for x, port in extra]
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node_id),
            "listeners": ",".join([*advertised, f"CONTROLLER://{self.host}:{ports.controller}"]),
            "advertised.listeners": ",".join(advertised),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(
                ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
                + [f"{x.name}:{x.protocol}" for x, _ in extra]
            ),
            "log.dirs": str(node_dir / "data"),
            **COMMON_PROPERTIES,
            **replication_properties(self.nodes),
        }
        for listener, _ in extra:
            prefix = f"listener.name.{listener.name.lower()}."
            props.update({prefix + key: value for key, value in listener.properties.items()})
        if self.nodes == 1:
            props["controller.quorum.bootstrap.servers"] = f"{self.host}:{ports.controller}"
        else:
            props["controller.quorum.voters"] = ",".join(
                f"{i}@{self.host}:{self._ports[i].controller}" for i in self.node_ids
            )
        props.update(self.properties)
        return props

    def _write_server_properties(self, node_id: int) -> None:
        node_dir = self.node_dir(node_id)
        node_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{key}={value}" for key, value in self.server_properties(node_id).items()]
        (node_dir / "server.properties").write_text(
            "# Written by captionstream.apache_kafka at every start; edits are lost.\n"
            + "\n".join(lines)
            + "\n"
        )

    def _java_base(self) -> list[str]:
        java = java_executable()
        if java is None:
            raise BrokerError(java_problem() or "no java")
        assert self._libs is not None
        return [
            java,
            "-cp",
            f"{self._libs}/*",
            "-XX:+UseSerialGC",  # measured: no slower than G1 here, fewer threads, less RSS
            "-XX:TieredStopAtLevel=1",  # C1 only: start-up ~2x faster on 2 cores
            "-XX:-UsePerfData",  # no /tmp/hsperfdata_* files
            "-Xshare:auto",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
        ]

    def _class_archive(self) -> Path:
        """The AppCDS archive of Kafka's classes for this jar folder and this Java build.

        Mapping classes already parsed and verified cuts a JVM's start-up by a third (a
        node: 2.8 s -> 1.8 s, the storage formatter: 1.1 s -> 0.55 s, measured on 2 cores).
        The first node started without one writes it when it exits (-XX:ArchiveClassesAtExit,
        ~3 s more at that stop); a JVM ignores an archive that does not match it (-Xshare:auto).
        """
        assert self._libs is not None
        java = Path(java_executable() or "java").resolve()
        stat = java.stat()
        build = hashlib.sha256(f"{java}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return self._libs.parent / f"kafka-classes-{build[:12]}.jsa"

    def _class_archive_options(self, node_id: int | None) -> list[str]:
        """Use the archive; or, for one node (not a formatter), write it at exit."""
        archive = self._class_archive()
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        if node_id is None or self._dumping is not None:
            return []
        for stale in archive.parent.glob(f"{archive.name}.*.partial"):  # left by a crash
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
        partial = archive.with_name(f"{archive.name}.{os.getpid()}-{node_id}.partial")
        self._dumping = (node_id, partial)
        # -Xlog: its many "skipping class" warnings at exit are noise in the node's log
        return [f"-XX:ArchiveClassesAtExit={partial}", "-Xlog:cds=off,cds+dynamic=off"]

    def _adopt_class_archive(self, node_id: int, proc: subprocess.Popen[bytes]) -> None:
        """Put the archive a node wrote at exit in place, if it exited (not SIGKILLed)."""
        if self._dumping is None or self._dumping[0] != node_id:
            return
        partial = self._dumping[1]
        self._dumping = None
        # 143: the JVM exited after SIGTERM and its shutdown hooks; the archive is written
        # at exit, so a killed JVM's file may be cut short
        if proc.returncode in (0, 143) and partial.exists():
            os.replace(partial, self._class_archive())
        else:
            partial.unlink(missing_ok=True)

    def _format_storage(self, deadline: float) -> None:
        """Format each node not formatted yet, all at once (a JVM each, ~2 s of CPU)."""
        formatting: dict[int, subprocess.Popen[bytes]] = {}
        for node_id in self.node_ids:
            if (self.node_dir(node_id) / "data" / "meta.properties").exists():
                continue
            cmd = [
                *self._java_base(),
                *self._class_archive_options(None),
                "-Xmx128m",
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                self._cluster_id,
                "--config",
                str(self.node_dir(node_id) / "server.properties"),
                "--ignore-formatted",
            ]
            for credential in self.scram_credentials:
                cmd += credential.format_option()
            if self.nodes == 1:
                cmd.append("--standalone")
            formatting[node_id] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=child_preexec(),
            )
        for node_id, proc in formatting.items():
            try:
                output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _wait_or_kill(list(formatting.values()), 0)
                raise BrokerError(f"formatting node {node_id} did not finish in time") from None
            if proc.returncode != 0:
                tail = "\n".join(output.decode(errors="replace").splitlines()[-20:])
                raise BrokerError(f"formatting node {node_id} failed:\n{tail}")

    def _launch(self, node_id: int) -> None:
        ports = self._ports[node_id]
        for port in (ports.client, ports.controller, *ports.listeners.values()):
            if port_open(self.host, port):
                raise BrokerError(f"{self.host}:{port} (node {node_id}) is already in use")
        assert self._libs is not None
        cmd = [
            *self._java_base(),
            *self._class_archive_options(node_id),
            f"-Xmx{self.heap_mb}m",
            f"-Xms{min(64, self.heap_mb)}m",
            "-XX:+ExitOnOutOfMemoryError",
            f"-Dkafka.logs.dir={self.node_dir(node_id)}",
            "kafka.Kafka",
            str(self.node_dir(node_id) / "server.properties"),
        ]
        log_file = self.log_file(node_id)
        self._log_offsets[node_id] = log_file.stat().st_size if log_file.exists() else 0
        with open(log_file, "ab") as out:  # the child keeps its own descriptor
            self._procs[node_id] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=child_preexec(),
            )

    def _logged_since_launch(self, node_id: int) -> str:
        with open(self.log_file(node_id), "rb") as handle:
            handle.seek(self._log_offsets[node_id])
            return handle.read().decode(errors="replace")

    def _log_tail(self, node_id: int, lines: int = 30) -> str:
        return "\n".join(self._logged_since_launch(node_id).splitlines()[-lines:])

    def _wait_ready(self, node_ids: list[int], deadline: float) -> None:
        """Each node logged READY_LINE, then the cluster's metadata lists all running nodes
        (a broker is listed only once the controller has unfenced it)."""
        waiting = set(node_ids)
        while waiting:
            for node_id in sorted(waiting):
                proc = self._procs[node_id]
                if proc.poll() is not None:
                    raise BrokerError(
                        f"Kafka node {node_id} exited with {proc.returncode} at start; "
                        f"{self.log_file(node_id)}:\n{self._log_tail(node_id)}"
                    )
                if READY_LINE in self._logged_since_launch(node_id):
                    waiting.discard(node_id)
            if waiting and time.monotonic() > deadline:
                raise BrokerError(f"Kafka node(s) {sorted(waiting)} did not start in time")
            if waiting:
                time.sleep(0.1)
        expected = set(self.pids)
        while True:
            remaining = deadline - time.monotonic()
            running = ",".join(self.address(i) for i in sorted(expected))
            seen = _run_coroutine(_broker_ids(running, max(1.0, min(10.0, remaining))))
            if expected <= seen:
                return
            if remaining <= 0:
                raise BrokerError(f"metadata lists brokers {sorted(seen)}, not {sorted(expected)}")
            time.sleep(0.2)

    def __enter__(self) -> ApacheKafkaCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _distinct_free_ports(host: str, taken: set[int], count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def _wait_or_kill(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("Kafka pid %d still running after %.0fs: SIGKILL", proc.pid, timeout_s)
            proc.kill()
            proc.wait()


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to the end from sync code, even when called inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _broker_ids(bootstrap: str, timeout_s: float) -> set[int]:
    """The broker ids a metadata request answers with; empty when none answers."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await client.bootstrap()
        return {int(broker.nodeId) for broker in client.cluster.brokers()}
    except (KafkaError, OSError):
        return set()
    finally:
        await client.close()
