"""The pipeline on secured listeners of a real Apache Kafka: SASL_SSL with SCRAM-SHA-512,
and mutual TLS, with certificates the tests make (tests/integration/tls.py).

Every component is given only the secured listener's address, so every one of its
clients (admin, producers, the gateway's view follower, the Faust worker's consumers,
producers and tables, `captionstream tail`) must speak TLS and authenticate there. The
PLAINTEXT listener the launcher keeps (replication, readiness) serves only this test's
own reads.

The broker runs Kafka's StandardAuthorizer: the SCRAM principals hold only the ACLs
`captionstream topics --grant` gives their component, and a principal missing one gets
an answer naming the operation and the topic.

Misconfigured clients are told the cause at once: a wrong password, a CA that did not
sign the broker's certificate, plaintext against a TLS listener, an mTLS client without
a certificate. A gateway serves unready, naming it in /readyz and in every 503; a worker
exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import NewTopic

from captionstream.apache_kafka import ApacheKafkaCluster, Listener, ScramCredential
from captionstream.errors import ConfigurationError
from captionstream.kafka import KafkaConnection
from captionstream.kafka.acls import Acl, component_acls, grant
from captionstream.schemas.topics import TOPICS
from captionstream.settings import CommonSettings, KafkaProfile
from tests.helpers.images import make_png
from tests.integration.apache import running_cluster
from tests.integration.stack import Component, Stack, all_succeed, read_topic, stack_on
from tests.tls import Issued, TestCA, keystore_properties

SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
OAUTH_LOGIN = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
USERS = {
    "gateway": "gateway-secret",
    "worker": "worker-secret",
    "reader": "reader-secret",  # a downstream consumer of the captions topic
    "gateway-no-images": "secret",  # the gateway's ACLs but one: WRITE on the images topic
}
# The broker's own traffic (PLAINTEXT, CONTROLLER) runs as ANONYMOUS; the mTLS client and
# the OAUTHBEARER token's subject are administrators here. The SCRAM users are not: they
# hold exactly the ACLs `captionstream topics --grant` gives their component.
SUPER_USERS = "User:ANONYMOUS;User:CN=worker-mtls;User:captionstream-tests"


@dataclass(frozen=True)
class SecuredKafka:
    cluster: ApacheKafkaCluster
    ca: TestCA
    other_ca: TestCA  # signed nothing the broker has: "untrusted"
    client: Issued  # the mTLS client certificate

    @property
    def sasl_ssl(self) -> str:
        return self.cluster.bootstrap_of("SASL_SSL")

    @property
    def mtls(self) -> str:
        return self.cluster.bootstrap_of("MTLS")

    def scram_env(self, user: str, password: str | None = None) -> dict[str, str]:
        return {
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP": self.sasl_ssl,
            "CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CAPTIONSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "CAPTIONSTREAM_KAFKA_SASL_USERNAME": user,
            "CAPTIONSTREAM_KAFKA_SASL_PASSWORD": password or USERS[user],
            "CAPTIONSTREAM_KAFKA_SSL_CAFILE": str(self.ca.cert_file),
        }

    def mtls_env(self) -> dict[str, str]:
        return {
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP": self.mtls,
            "CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CAPTIONSTREAM_KAFKA_SSL_CAFILE": str(self.ca.cert_file),
            "CAPTIONSTREAM_KAFKA_SSL_CERTFILE": str(self.client.cert),
            "CAPTIONSTREAM_KAFKA_SSL_KEYFILE": str(self.client.key),
        }


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    root = tmp_path_factory.mktemp("secured-kafka")
    ca = TestCA(root / "pki")
    broker = ca.issue("broker", server=True)
    tls = keystore_properties(broker, ca)
    listeners = [
        Listener(
            "SASL_SSL",
            "SASL_SSL",
            {
                **tls,
                "sasl.enabled.mechanisms": "SCRAM-SHA-512,OAUTHBEARER",
                "scram-sha-512.sasl.jaas.config": SCRAM_LOGIN,
                # Kafka's default OAUTHBEARER validator accepts unsigned tokens: enough to
                # prove the token-provider hook end to end, never a production setting.
                "oauthbearer.sasl.jaas.config": OAUTH_LOGIN,
            },
        ),
        Listener("MTLS", "SSL", {**tls, "ssl.client.auth": "required"}),
    ]
    credentials = [ScramCredential(name, password) for name, password in USERS.items()]
    for cluster in running_cluster(
        root / "kafka",
        nodes=1,
        listeners=listeners,
        scram_credentials=credentials,
        properties={
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": SUPER_USERS,
        },
    ):
        other_ca = TestCA(root / "other-pki", "other CA")
        yield SecuredKafka(cluster, ca, other_ca, ca.issue("worker-mtls", server=False))


@pytest.fixture
def secured_stack(secured_kafka: SecuredKafka, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose own reads go over PLAINTEXT; each component gets its secured
    listener and credentials from the test."""
    with stack_on(secured_kafka.cluster, tmp_path) as stack:
        yield stack


@pytest.fixture(scope="module")
def least_privilege(secured_kafka: SecuredKafka, tmp_path_factory: pytest.TempPathFactory) -> None:
    """What an administrator does before the first start: create the topics and grant
    each component's principal its ACLs, with `captionstream topics` (over PLAINTEXT, as
    ANONYMOUS, a super user here)."""
    admin = subprocess.run(
        [
            sys.executable,
            "-m",
            "captionstream",
            "topics",
            "--create",
            "--grant",
            "gateway=User:gateway",
            "--grant",
            "processor=User:worker",
            "--grant",
            "tail=User:reader",
        ],
        env={
            **os.environ,
            "CAPTIONSTREAM_KAFKA_BOOTSTRAP": secured_kafka.cluster.bootstrap,
            "CAPTIONSTREAM_DATA_DIR": str(tmp_path_factory.mktemp("admin")),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert admin.returncode == 0, admin.stderr[-3000:]
    assert "granted User:worker the" in admin.stderr


def run_pipeline(
    stack: Stack,
    gateway_env: dict[str, str],
    worker_env: dict[str, str],
    reader_env: dict[str, str],
    salt: int,
) -> None:
    """Upload images, poll their status until SUCCESS (as clients do), and read the
    captions with `captionstream tail` as a downstream consumer. `salt` keeps each run's
    images apart (the caption cache would answer repeats without the worker)."""
    worker = stack.start_worker(60, **worker_env)
    gateway = stack.start_gateway(60, None, **gateway_env)
    job_ids = []
    for i in range(4):
        response = gateway.upload(make_png(60 + i, 50, color=(i, salt, 200)))
        assert response.status_code == 202, response.text
        job_ids.append(str(response.json()["job_id"]))
    views = asyncio.run(all_succeed(gateway, job_ids, timeout_s=90))
    on_topic = len(asyncio.run(read_topic(stack.bootstrap, TOPICS.captions.name)))  # PLAINTEXT
    tail = subprocess.run(
        [sys.executable, "-m", "captionstream", "tail", "--from-beginning", "--max", str(on_topic)],
        env=stack.env(**reader_env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tail.returncode == 0, tail.stderr[-2000:]
    tailed = {
        event["job_id"]: event["caption"] for event in map(json.loads, tail.stdout.splitlines())
    }
    assert worker.log().count("captioned") >= len(job_ids), "the worker captioned them"
    for job_id in job_ids:
        result = views[job_id]["result"]
        assert isinstance(result, dict)
        assert tailed[job_id] == result["caption"]
    assert worker.alive()


def test_pipeline_over_sasl_ssl_with_scram_and_least_privilege(
    secured_kafka: SecuredKafka, secured_stack: Stack, least_privilege: None
) -> None:
    """Gateway, worker and a downstream reader authenticate as their own SCRAM users over
    TLS, each holding only the ACLs `captionstream topics` lists for it (the broker's
    StandardAuthorizer on)."""
    kafka = secured_kafka
    run_pipeline(
        secured_stack,
        kafka.scram_env("gateway"),
        kafka.scram_env("worker"),
        kafka.scram_env("reader"),
        salt=1,
    )


def test_pipeline_over_mutual_tls(secured_kafka: SecuredKafka, secured_stack: Stack) -> None:
    """Gateway and worker prove who they are with a client certificate."""
    env = secured_kafka.mtls_env()
    run_pipeline(secured_stack, env, env, env, salt=2)


async def test_a_missing_acl_is_named_in_the_answer(
    secured_kafka: SecuredKafka, secured_stack: Stack, least_privilege: None
) -> None:
    """A gateway principal holding all its ACLs but WRITE on the images topic: a submit
    is refused with 503, naming the operation and the topic, and no Retry-After (waiting
    does not fix an ACL)."""
    acls = component_acls("captionstream-processor", "captionstream-webhooks", transactional=False)
    missing = Acl("TOPIC", TOPICS.images.name, "WRITE")
    assert missing in acls["gateway"]
    admin = KafkaConnection(secured_kafka.cluster.bootstrap, KafkaProfile.KAFKA)
    granted = [acl for acl in acls["gateway"] if acl != missing]
    assert await grant(admin, "User:gateway-no-images", granted) == len(granted)

    gateway = secured_stack.start_gateway(60, None, **secured_kafka.scram_env("gateway-no-images"))
    response = gateway.upload(make_png(70, 70, color=(3, 3, 3)))
    assert response.status_code == 503, response.text
    assert f"WRITE on topic {TOPICS.images.name}" in response.json()["detail"]
    assert "retry-after" not in response.headers


def exits_with(component: Component, timeout_s: float) -> tuple[int, float, str]:
    """Wait for `component` to exit by itself: (exit code, seconds, its log)."""
    started = time.monotonic()
    try:
        code = component.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        component.stop()
        pytest.fail(
            f"{component.name} still running after {timeout_s} s:\n{component.log()[-3000:]}"
        )
    return code, time.monotonic() - started, component.log()


def misconfigured(case: str, kafka: SecuredKafka) -> tuple[dict[str, str], str]:
    """The settings of one misconfigured client, and the cause its error must name."""
    if case == "wrong password":
        return (
            kafka.scram_env("gateway", password="not-the-password"),
            "authentication failed (SASL_SSL, SCRAM-SHA-512 as gateway",
        )
    if case == "untrusted certificate":
        env = kafka.scram_env("gateway")
        env["CAPTIONSTREAM_KAFKA_SSL_CAFILE"] = str(kafka.other_ca.cert_file)
        return env, "the broker's TLS certificate is not trusted"
    if case == "plaintext against TLS":
        return (
            {"CAPTIONSTREAM_KAFKA_BOOTSTRAP": kafka.sasl_ssl},
            "with security protocol PLAINTEXT: is this a TLS or SASL listener?",
        )
    assert case == "mTLS, no certificate"
    env = {n: v for n, v in kafka.mtls_env().items() if not n.endswith(("_CERTFILE", "_KEYFILE"))}
    return env, "or a client certificate"


@pytest.mark.parametrize(
    "case",
    [
        "wrong password",
        "untrusted certificate",
        "plaintext against TLS",
        "mTLS, no certificate",
    ],
)
def test_a_misconfigured_gateway_stays_unready_naming_the_cause(
    secured_kafka: SecuredKafka, secured_stack: Stack, case: str
) -> None:
    """It serves (liveness), but /readyz and a submit answer 503 with the cause; it
    keeps trying, so fixing the broker side heals it without a restart."""
    env, cause = misconfigured(case, secured_kafka)
    started = time.monotonic()
    gateway = secured_stack.start_gateway(60, None, ready=False, **env)
    seconds = time.monotonic() - started
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    assert cause in ready.json()["detail"], ready.text
    submit = gateway.upload(make_png(11, 11))
    assert submit.status_code == 503, submit.text
    assert cause in submit.json()["detail"], submit.text
    assert int(submit.headers["retry-after"]) > 0
    log = gateway.component.log() if gateway.component else ""
    assert cause in log, log[-3000:]
    assert "not-the-password" not in log, "a secret reached the log"
    print(f"{case}: the gateway served, unready with the cause, after {seconds:.1f} s")


def test_a_worker_with_a_wrong_password_exits_non_zero(
    secured_kafka: SecuredKafka, secured_stack: Stack
) -> None:
    worker = secured_stack.spawn("worker", **secured_kafka.scram_env("worker", "wrong-secret"))
    code, seconds, log = exits_with(worker, timeout_s=90)
    assert code != 0
    assert "authentication failed (SASL_SSL, SCRAM-SHA-512 as worker" in log, log[-3000:]
    assert "wrong-secret" not in log
    print(f"a worker with a wrong password exited with {code} after {seconds:.1f} s")


async def test_oauthbearer_tokens_come_from_the_configured_provider(
    secured_kafka: SecuredKafka,
) -> None:
    """The token-provider hook: `module:factory` from the settings, used by every client."""
    settings = CommonSettings(
        kafka_bootstrap=secured_kafka.sasl_ssl,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="OAUTHBEARER",
        kafka_sasl_oauth_token_provider="tests.tokens:unsigned_token_provider",
        kafka_ssl_cafile=secured_kafka.ca.cert_file,
    )
    kafka = KafkaConnection.from_settings(settings, "tests")
    admin = kafka.admin()
    await admin.start()
    try:
        await admin.create_topics([NewTopic("oauth-check", 1, 1)])
    finally:
        await admin.close()
    producer = kafka.producer()
    await producer.start()
    try:
        metadata = await producer.send_and_wait("oauth-check", b"{}", key=b"oauth")
        assert metadata.offset == 0
    finally:
        await producer.stop()

    unknown = settings.model_copy(update={"kafka_sasl_oauth_token_provider": "tests.nowhere:x"})
    with pytest.raises(ConfigurationError, match="cannot import it"):
        KafkaConnection.from_settings(unknown, "tests").admin()
