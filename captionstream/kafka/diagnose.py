"""Why a client cannot reach Kafka, in words an operator can act on.

aiokafka reports every failed bootstrap as "Unable to bootstrap from [...]" and only logs
the cause per broker. When the first contact fails, `diagnose` opens one connection to
each bootstrap server the way every client of this connection would (TLS, SASL), sends
one metadata request, and names what went wrong: nothing listening, a certificate not
trusted, a TLS/plaintext mismatch, a mechanism the listener does not offer, or
credentials the broker refused.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from captionstream.errors import BrokerError

if TYPE_CHECKING:
    from captionstream.kafka.connection import KafkaConnection


async def diagnose(connection: KafkaConnection, timeout_s: float = 10) -> str:
    """One line per bootstrap server that fails (empty when each answers)."""
    problems = []
    for server in connection.bootstrap_servers:
        problem = await diagnose_server(connection, server, timeout_s)
        if problem:
            problems.append(f"{server}: {problem}")
    return "; ".join(problems)


async def diagnose_server(connection: KafkaConnection, server: str, timeout_s: float) -> str:
    host, _, port = server.rpartition(":")
    security = connection.security
    protocol = security.protocol
    try:
        kwargs: dict[str, Any] = security.aiokafka_kwargs()
    except Exception as exc:  # a settings problem: the files, the token provider
        return str(exc)
    conn = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await create_conn(
                host.strip("[]"),
                int(port),
                client_id=connection.client_id,
                request_timeout_ms=int(timeout_s * 1000),
                **kwargs,
            )
            await conn.send(MetadataRequest([]))
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the broker's TLS certificate is not trusted ({exc.verify_message}); set "
            "CAPTIONSTREAM_KAFKA_SSL_CAFILE to the CA that signed it"
            + ("" if security.cafile is None else f" (now {security.cafile})")
        )
    except ssl.SSLError as exc:
        return (
            f"TLS handshake failed ({exc.reason or exc}): the listener may not be TLS, or "
            f"it refused this client's certificate; security protocol {protocol.value}"
        )
    except kafka_errors.UnsupportedSaslMechanismError as exc:
        return f"SASL mechanism not offered by this listener: {exc}"
    except (
        kafka_errors.SaslAuthenticationFailed,
        kafka_errors.AuthenticationFailedError,
        kafka_errors.IllegalSaslStateError,
    ) as exc:
        return (
            f"authentication failed ({security.describe()}): the broker says "
            f"{exc.args[0] if exc.args else type(exc).__name__}"
        )
    except ConnectionRefusedError:
        return "connection refused: nothing listens there"
    except (TimeoutError, kafka_errors.KafkaConnectionError, ConnectionError, OSError) as exc:
        return _silent_broker(protocol.value, exc)
    except kafka_errors.KafkaError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if conn is not None:
            conn.close()
    return ""


def _silent_broker(protocol: str, exc: BaseException) -> str:
    """The broker closed the connection, or never answered: the classic sign of a client
    whose security protocol is not the listener's."""
    what = "no answer" if isinstance(exc, TimeoutError) else "the broker closed the connection"
    hints = {
        "PLAINTEXT": "is this a TLS or SASL listener? Set CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL",
        "SASL_PLAINTEXT": "is this a TLS listener? Then the protocol is SASL_SSL",
        "SSL": "does this listener want SASL too (SASL_SSL), or a client certificate "
        "(CAPTIONSTREAM_KAFKA_SSL_CERTFILE/_KEYFILE)?",
        "SASL_SSL": "does this listener speak SASL?",
    }
    return f"{what} with security protocol {protocol}: {hints[protocol]}"


async def unreachable(connection: KafkaConnection, exc: BaseException) -> BrokerError:
    """The error for a first contact that failed with `exc`, with the diagnosed cause."""
    cause = await diagnose(connection) or repr(exc)
    return BrokerError(
        f"cannot reach Kafka at {connection.bootstrap} ({connection.security.describe()}): "
        f"{cause}. Start one with `captionstream broker`, or set "
        "CAPTIONSTREAM_KAFKA_BOOTSTRAP (and CAPTIONSTREAM_KAFKA_SECURITY_PROTOCOL, ...)"
    )
