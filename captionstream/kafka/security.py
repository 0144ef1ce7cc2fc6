"""How a client proves who it is and protects the wire: TLS, mTLS and SASL.

One `KafkaSecurity` per process, from the settings; `KafkaConnection` hands it to every
aiokafka client it builds and to the Faust app (as `broker_credentials`), so an admin
client, a reader and a worker cannot disagree about how to reach a secured cluster.
Secrets stay `SecretStr` until the moment a client is built, so `repr()` and logs of
settings or connections never show them.
"""

from __future__ import annotations

import importlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from captionstream.errors import ConfigurationError
from captionstream.settings import CommonSettings, KafkaSaslMechanism, KafkaSecurityProtocol


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.PLAINTEXT
    sasl_mechanism: KafkaSaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    oauth_token_provider: str | None = None  # "package.module:factory"
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    key_password: SecretStr | None = None
    check_hostname: bool = True

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> KafkaSecurity:
        return cls(
            protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=settings.kafka_sasl_password,
            oauth_token_provider=settings.kafka_sasl_oauth_token_provider,
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            key_password=settings.kafka_ssl_key_password,
            check_hostname=settings.kafka_ssl_check_hostname,
        )

    def describe(self) -> str:
        """What a log line or an error may say about it: never a secret."""
        parts = [self.protocol.value]
        if self.sasl_mechanism is not None:
            who = f" as {self.sasl_username}" if self.sasl_username else ""
            parts.append(f"{self.sasl_mechanism.value}{who}")
        if self.certfile is not None:
            parts.append(f"client certificate {self.certfile}")
        if self.cafile is not None:
            parts.append(f"CA {self.cafile}")
        return ", ".join(parts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL and SASL_SSL (None otherwise): the CA file or the
        system's trust store, the client certificate for mTLS, TLS 1.2 at least."""
        if not self.protocol.tls:
            return None
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=None if self.cafile is None else str(self.cafile),
                certfile=None if self.certfile is None else str(self.certfile),
                keyfile=None if self.keyfile is None else str(self.keyfile),
                password=None
                if self.key_password is None
                else self.key_password.get_secret_value(),
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot load the Kafka TLS files ({self.describe()}): {exc}"
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.check_hostname
        return context

    def token_provider(self) -> AbstractTokenProvider:
        """The OAUTHBEARER token source named by `oauth_token_provider`."""
        target = self.oauth_token_provider or ""
        module_name, _, attribute = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigurationError(
                f"kafka_sasl_oauth_token_provider={target!r}: cannot import it ({exc}); "
                "expected `package.module:factory`"
            ) from exc
        provider = factory()
        if not isinstance(provider, AbstractTokenProvider):
            raise ConfigurationError(
                f"kafka_sasl_oauth_token_provider={target!r} returned "
                f"{type(provider).__name__}, not an aiokafka AbstractTokenProvider"
            )
        return provider

    def _password(self) -> str | None:
        return None if self.sasl_password is None else self.sasl_password.get_secret_value()

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """aiokafka's keyword arguments (the same for producers, consumers, admin)."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol.value}
        context = self.ssl_context()
        if context is not None:
            kwargs["ssl_context"] = context
        mechanism = self.sasl_mechanism
        if mechanism is None:
            return kwargs
        kwargs["sasl_mechanism"] = mechanism.value
        if mechanism is KafkaSaslMechanism.OAUTHBEARER:
            kwargs["sasl_oauth_token_provider"] = self.token_provider()
        else:
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self._password()
        return kwargs

    def faust_credentials(self) -> Any:
        """Faust's `broker_credentials` for the same connection (None: PLAINTEXT)."""
        import faust  # the processor's dependency; imported only where a worker needs it

        context = self.ssl_context()
        mechanism = self.sasl_mechanism
        if mechanism is KafkaSaslMechanism.OAUTHBEARER:
            return faust.OAuthCredentials(oauth_cb=self.token_provider(), ssl_context=context)
        if mechanism is not None:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self._password(),
                ssl_context=context,
                mechanism=mechanism.value,
            )
        if context is not None:
            return faust.SSLCredentials(context)
        return None
