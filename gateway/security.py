"""Who may call the API and how often: API keys, a per-client rate limit on submissions,
and CORS for browsers on other origins. All off by default.

- API keys (`CAPTIONSTREAM_API_KEYS`): every /api/v1 route, HTTP and WebSocket, requires
  one in the `X-API-Key` header; a WebSocket may pass it as the `api_key` query parameter
  instead (browsers cannot set headers on a WebSocket). A missing or unknown key is a 401
  with a JSON `detail`; on a WebSocket, a `detail` message and close code 4401. Keys are
  compared in constant time. /healthz, /readyz, /metrics, /docs, /openapi.json and the
  demo page are not under /api/v1 and stay open.
- Rate limit (`CAPTIONSTREAM_RATE_LIMIT_PER_MINUTE`, `_BURST`): a token bucket per API key
  (per client address when there are no keys) for submissions only; over it, a 429 with
  a JSON `detail` and `Retry-After` in whole seconds.
- CORS (`CAPTIONSTREAM_CORS_ORIGINS`, `_ALLOW_CREDENTIALS`): Starlette's CORSMiddleware;
  `*` together with credentials is refused at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, Security, WebSocket
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.exceptions import WebSocketException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

from captionstream.errors import ConfigurationError, RateLimited, Unauthorized
from captionstream.gateway.openapi import error_responses
from captionstream.settings import GatewaySettings

API_KEY_HEADER_NAME = "X-API-Key"
API_KEY_QUERY_NAME = "api_key"  # WebSockets only
WS_UNAUTHORIZED = 4401  # close code: 4000 + the HTTP status, as 4404 for an unknown job

Clock = Callable[[], float]

# The OpenAPI security scheme (the "Authorize" button of /docs). Checking is ours, below.
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER_NAME,
    scheme_name="ApiKey",
    description="One of CAPTIONSTREAM_API_KEYS. WebSockets may pass it as the "
    f"`{API_KEY_QUERY_NAME}` query parameter instead.",
    auto_error=False,
)


# --- API keys -------------------------------------------------------------------------


class ApiKeys:
    """The configured keys. A key is compared with all of them, by SHA-256 digest with
    `hmac.compare_digest`: the time taken reveals neither which key nor how much of one
    matched, nor a key's length."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [self._digest(key) for key in keys if key]

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def match(self, candidate: str | None) -> int | None:
        """The index of the configured key equal to `candidate`, or None."""
        if not candidate:
            return None
        digest = self._digest(candidate)
        found: int | None = None
        for index, known in enumerate(self._digests):  # no early exit
            if hmac.compare_digest(known, digest) and found is None:
                found = index
        return found


# --- rate limit -----------------------------------------------------------------------


class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate_per_s`; a request takes one.

    Pure arithmetic on the injected clock (seconds, monotonic), so it is tested without
    sleeping.
    """

    def __init__(self, rate_per_s: float, capacity: int, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or capacity < 1:
            raise ValueError("a token bucket needs a positive rate and capacity >= 1")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.clock = clock
        self.tokens = float(capacity)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self.updated)  # a clock that steps back adds nothing
        self.tokens = min(float(self.capacity), self.tokens + elapsed * self.rate_per_s)
        self.updated = now

    def try_take(self) -> float:
        """Take a token: 0.0 when taken, else the seconds until one will be available
        (nothing is taken then)."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity


class RateLimiter:
    """One `TokenBucket` per client identity.

    A full bucket is the same as no bucket, so when more than `max_clients` are held the
    full ones are dropped; if that is not enough (a flood of distinct clients), the
    oldest go, which can only ever let a client through early, never refuse it wrongly.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        clock: Clock = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def try_take(self, client: str) -> float:
        """0.0 when `client` may go ahead, else the seconds it has to wait."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._prune()
            bucket = TokenBucket(self.per_minute / 60, self.burst, self.clock)
            self._buckets[client] = bucket
        return bucket.try_take()

    def _prune(self) -> None:
        for client in [c for c, bucket in self._buckets.items() if bucket.full]:
            del self._buckets[client]
        excess = len(self._buckets) - self.max_clients + 1
        for client in list(self._buckets)[: max(0, excess)]:
            del self._buckets[client]


def retry_after_seconds(wait_s: float) -> int:
    """`Retry-After` is whole seconds: rounded up, and never 0 for a refusal."""
    return max(1, math.ceil(wait_s))


# --- CORS -----------------------------------------------------------------------------

CORS_ALLOW_METHODS = ("GET", "POST")
CORS_ALLOW_HEADERS = (API_KEY_HEADER_NAME, "Idempotency-Key", "Content-Type")
CORS_EXPOSE_HEADERS = ("Location", "Retry-After", "Idempotent-Replayed")


def cors_options(origins: Sequence[str], allow_credentials: bool) -> dict[str, Any] | None:
    """CORSMiddleware's arguments, or None for no CORS headers at all (no origins).

    Raises `ConfigurationError` for `*` with credentials (any origin could then act
    with a user's credentials; browsers refuse it too) and for an entry that is not an
    origin (`scheme://host[:port]`: a trailing slash or path never matches).
    """
    if not origins:
        return None
    if "*" in origins and allow_credentials:
        raise ConfigurationError(
            "CAPTIONSTREAM_CORS_ORIGINS='*' cannot be combined with "
            "CAPTIONSTREAM_CORS_ALLOW_CREDENTIALS=true: list the origins that may send "
            "credentials, or turn credentials off"
        )
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or origin != (f"{parts.scheme}://{parts.netloc}")
        ):
            raise ConfigurationError(
                f"CAPTIONSTREAM_CORS_ORIGINS: {origin!r} is not an origin; expected "
                "scheme://host[:port] without a path, e.g. https://app.example.com"
            )
    return {
        "allow_origins": ["*"] if "*" in origins else list(origins),
        "allow_credentials": allow_credentials,
        "allow_methods": list(CORS_ALLOW_METHODS),
        "allow_headers": list(CORS_ALLOW_HEADERS),
        "expose_headers": list(CORS_EXPOSE_HEADERS),
    }


# --- wiring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessControl:
    """What the dependencies below consult, on `app.state.access`."""

    keys: ApiKeys
    limiter: RateLimiter | None

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, clock: Clock = time.monotonic
    ) -> AccessControl:
        limiter = None
        if settings.rate_limit_per_minute > 0:
            limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst, clock)
        return cls(ApiKeys(k.get_secret_value() for k in settings.api_keys), limiter)


async def client_identity(connection: HTTPConnection) -> str:
    """Who is calling: `key:<n>` (the n-th configured key) or, without keys, `ip:<address>`.

    With keys configured, a missing or unknown key ends the request here: 401, or on a
    WebSocket a `detail` message and close code 4401 (the socket is accepted first, since
    a close before accepting reaches the client as a bare HTTP 403).
    """
    access: AccessControl = connection.app.state.access
    if not access.keys.enabled:
        return f"ip:{connection.client.host if connection.client else 'unknown'}"
    candidate = connection.headers.get(API_KEY_HEADER_NAME)
    websocket = connection.scope["type"] == "websocket"
    if candidate is None and websocket:
        candidate = connection.query_params.get(API_KEY_QUERY_NAME)
    index = access.keys.match(candidate)
    if index is not None:
        return f"key:{index}"
    where = f"the {API_KEY_HEADER_NAME} header"
    if websocket:
        where += f" or the {API_KEY_QUERY_NAME} query parameter"
    detail = f"{'an unknown' if candidate else 'no'} API key; send a valid one in {where}"
    if websocket:
        assert isinstance(connection, WebSocket)
        await connection.accept()
        await connection.send_json({"detail": detail})
        raise WebSocketException(WS_UNAUTHORIZED, reason="unauthorized")
    raise Unauthorized(detail)


ClientIdentity = Annotated[str, Depends(client_identity)]


async def require_api_key(
    identity: ClientIdentity,
    _documented: Annotated[str | None, Security(api_key_header)],
) -> str:
    """Router dependency for /api/v1 when keys are configured (`api_dependencies`);
    `_documented` only puts the scheme into the OpenAPI document."""
    return identity


async def limit_submissions(request: Request, identity: ClientIdentity) -> None:
    """Route dependency of the submission routes: one token per submission."""
    access: AccessControl = request.app.state.access
    if access.limiter is None:
        return
    wait_s = access.limiter.try_take(identity)
    if wait_s > 0:
        limiter = access.limiter
        who = "API key" if identity.startswith("key:") else "client address"
        raise RateLimited(
            f"rate limit: {limiter.per_minute:g} submissions per minute (bursts of "
            f"{limiter.burst}) per {who}; retry in {retry_after_seconds(wait_s)} s",
            retry_after_s=retry_after_seconds(wait_s),
        )


def api_router_options(settings: GatewaySettings) -> dict[str, Any]:
    """`include_router` arguments for every router under /api/v1: the API key check and
    its 401 when keys are configured (nothing otherwise, so the OpenAPI document shows
    no scheme)."""
    if not settings.api_keys:
        return {}
    return {
        "dependencies": [Depends(require_api_key)],
        # Explicit JSON: the 401 is JSON on every route, Server-Sent Events too.
        "responses": error_responses(401, json_route=False),
    }


def install_security(app: FastAPI, settings: GatewaySettings) -> None:
    """Keys and rate limit on `app.state.access`, their error responses, and CORS.

    Call after adding the other middleware: CORS must be the outermost, so that its
    headers are on every answer (a 401, 413 or 429 too) and preflights end there.
    Raises `ConfigurationError` for a bad CORS setting, before anything is served.
    """
    cors = cors_options(settings.cors_origins, settings.cors_allow_credentials)
    app.state.access = AccessControl.from_settings(settings)

    async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Unauthorized)
        return JSONResponse(
            {"detail": exc.detail},
            status_code=exc.http_status,
            headers={"WWW-Authenticate": "APIKey"},
        )

    async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        return JSONResponse(
            {"detail": exc.detail},
            status_code=exc.http_status,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(RateLimited, rate_limited)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)
