"""An OAUTHBEARER token provider for tests, loaded by name from the settings
(`CAPTIONSTREAM_KAFKA_SASL_OAUTH_TOKEN_PROVIDER=tests.tokens:unsigned_token_provider`).

It mints unsigned JWTs (`alg: none`), which Kafka's default OAUTHBEARER validator
accepts; a real provider (MSK IAM, an OIDC client-credentials flow) fetches signed ones.
"""

from __future__ import annotations

import base64
import json
import time

from aiokafka.abc import AbstractTokenProvider


def _b64(part: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")


class UnsignedTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self, subject: str) -> None:
        self.subject = subject

    async def token(self) -> str:
        now = int(time.time())
        claims = {"sub": self.subject, "iat": now, "exp": now + 3600}
        return f"{_b64({'alg': 'none'})}.{_b64(claims)}."


def unsigned_token_provider() -> UnsignedTokenProvider:
    return UnsignedTokenProvider("captionstream-tests")
