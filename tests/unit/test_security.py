"""Access control without a broker: the token bucket on a fake clock, API key matching,
CORS validation, and the dependencies on a small app wired like the gateway."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from captionstream.errors import ConfigurationError
from captionstream.gateway.app import create_app
from captionstream.gateway.deps import SubmissionRateLimit
from captionstream.gateway.security import (
    ApiKeys,
    RateLimiter,
    TokenBucket,
    api_router_options,
    cors_options,
    install_security,
    retry_after_seconds,
)
from captionstream.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- token bucket ---------------------------------------------------------------------


def test_bucket_allows_a_burst_then_tells_how_long_to_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=0.5, capacity=3, clock=clock)  # one token per 2 s
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(2.0)
    clock.advance(0.5)
    assert bucket.try_take() == pytest.approx(1.5), "a refusal takes nothing"
    clock.advance(1.5)
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == pytest.approx(2.0)


def test_bucket_refills_up_to_its_capacity_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1, capacity=2, clock=clock)
    bucket.try_take()
    bucket.try_take()
    clock.advance(3600)
    assert bucket.full
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_bucket_ignores_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1, capacity=1, clock=clock)
    assert bucket.try_take() == 0.0
    clock.advance(-50)
    assert bucket.try_take() == pytest.approx(1.0)
    clock.advance(1)
    assert bucket.try_take() == 0.0


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (-1, 1), (1, 0)])
def test_bucket_refuses_nonsense(rate: float, capacity: int) -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(rate, capacity)


def test_limiter_keeps_one_bucket_per_client() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)  # one token per 10 s
    assert limiter.try_take("key:0") == 0.0
    assert limiter.try_take("key:0") == 0.0
    assert limiter.try_take("key:0") == pytest.approx(10.0)
    assert limiter.try_take("key:1") == 0.0, "another client has its own bucket"
    clock.advance(10)
    assert limiter.try_take("key:0") == 0.0


def test_limiter_forgets_full_buckets_first_when_holding_too_many() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=1, clock=clock, max_clients=3)
    for client in ("a", "b", "c"):
        limiter.try_take(client)
    clock.advance(0.5)
    limiter.try_take("a")  # refused: a's bucket is empty, b's and c's are too
    clock.advance(0.6)  # b and c are full again (1 s), a is not (its refusal took nothing)
    limiter.try_take("a")
    assert limiter.try_take("d") == 0.0
    assert len(limiter) <= 3
    assert limiter.try_take("a") == pytest.approx(1.0), "a's state was kept"


def test_limiter_stays_bounded_under_a_flood_of_clients() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, clock=FakeClock(), max_clients=100)
    for n in range(1000):
        assert limiter.try_take(f"ip:10.0.{n // 256}.{n % 256}") == 0.0
    assert len(limiter) <= 100


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.999, 1), (1.0, 1), (1.01, 2)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


# --- API keys -------------------------------------------------------------------------


def test_api_keys_match_by_index_and_refuse_the_rest() -> None:
    keys = ApiKeys(["k1", "k2"])
    assert keys.enabled
    assert keys.match("k1") == 0
    assert keys.match("k2") == 1
    for wrong in ("k3", "k", "k1 ", "K1", "", None):
        assert keys.match(wrong) is None, wrong
    assert not ApiKeys([]).enabled
    assert not ApiKeys([""]).enabled


def test_api_keys_compare_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ApiKeys(["first", "second", "third"])
    assert keys.match("first") == 0
    assert len(calls) == 3, "no early exit on the first match"
    assert all(len(a) == len(b) == 32 for a, b in calls), "digests, not the keys themselves"


def test_settings_read_comma_separated_keys_and_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_API_KEYS", " k1, k2,,")
    monkeypatch.setenv("CAPTIONSTREAM_CORS_ORIGINS", "https://a.example, http://b.example:8080")
    settings = GatewaySettings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings), "keys never show in a repr or a log"
    assert settings.cors_origins == ["https://a.example", "http://b.example:8080"]
    assert settings.rate_limit_per_minute == 0
    assert not settings.cors_allow_credentials


# --- CORS -----------------------------------------------------------------------------


def test_no_origins_means_no_cors() -> None:
    assert cors_options([], allow_credentials=True) is None


def test_wildcard_with_credentials_is_refused_naming_both_settings() -> None:
    with pytest.raises(ConfigurationError) as refused:
        cors_options(["https://a.example", "*"], allow_credentials=True)
    assert "CAPTIONSTREAM_CORS_ORIGINS" in refused.value.detail
    assert "CAPTIONSTREAM_CORS_ALLOW_CREDENTIALS" in refused.value.detail


def test_wildcard_without_credentials_and_listed_origins_are_fine() -> None:
    wildcard = cors_options(["*"], allow_credentials=False)
    assert wildcard is not None
    assert wildcard["allow_origins"] == ["*"]
    assert not wildcard["allow_credentials"]
    listed = cors_options(["https://a.example", "http://127.0.0.1:3000"], allow_credentials=True)
    assert listed is not None
    assert listed["allow_origins"] == ["https://a.example", "http://127.0.0.1:3000"]
    assert listed["allow_credentials"]
    assert "X-API-Key" in listed["allow_headers"]
    assert "Retry-After" in listed["expose_headers"]


@pytest.mark.parametrize(
    "origin", ["https://a.example/", "https://a.example/app", "a.example", "ftp://a.example"]
)
def test_what_is_not_an_origin_is_refused(origin: str) -> None:
    with pytest.raises(ConfigurationError, match="is not an origin"):
        cors_options([origin], allow_credentials=False)


def test_the_gateway_refuses_to_start_with_wildcard_and_credentials() -> None:
    settings = GatewaySettings(cors_origins=["*"], cors_allow_credentials=True)
    with pytest.raises(ConfigurationError, match="CAPTIONSTREAM_CORS_ALLOW_CREDENTIALS"):
        create_app(settings)


# --- the dependencies, on a small app wired as the gateway ------------------------------


def small_app(**settings: object) -> FastAPI:
    """/api/v1 with a submission, a read and a WebSocket; /open outside it."""
    config = GatewaySettings.model_validate(settings)
    app = FastAPI()
    install_security(app, config)
    api = APIRouter(prefix="/api/v1")

    @api.post("/submit", dependencies=[SubmissionRateLimit], status_code=202)
    async def submit() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/read")
    async def read() -> dict[str, str]:
        return {"ok": "yes"}

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"hello": "you"})
        await websocket.close()

    @app.get("/open")
    async def open_route() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(api, **api_router_options(config))
    return app


@pytest.fixture
def secured() -> Iterator[TestClient]:
    with TestClient(small_app(api_keys="k1,k2")) as client:
        yield client


def test_without_keys_everything_is_open() -> None:
    with TestClient(small_app()) as client:
        assert client.post("/api/v1/submit").status_code == 202
        assert client.get("/api/v1/read").status_code == 200
        with client.websocket_connect("/api/v1/ws") as ws:
            assert ws.receive_json() == {"hello": "you"}


def test_keys_guard_http_routes_under_the_api_only(secured: TestClient) -> None:
    missing = secured.get("/api/v1/read")
    assert missing.status_code == 401
    assert "no API key" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "APIKey"
    wrong = secured.post("/api/v1/submit", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    assert "unknown API key" in wrong.json()["detail"]
    in_query = secured.get("/api/v1/read", params={"api_key": "k1"})
    assert in_query.status_code == 401, "HTTP takes the key from the header only"
    assert secured.get("/api/v1/read", headers={"X-API-Key": "k2"}).status_code == 200
    assert secured.post("/api/v1/submit", headers={"X-API-Key": "k1"}).status_code == 202
    assert secured.get("/open").status_code == 200


def test_keys_guard_websockets_by_header_or_query(secured: TestClient) -> None:
    with secured.websocket_connect("/api/v1/ws?api_key=k1") as ws:
        assert ws.receive_json() == {"hello": "you"}
    with secured.websocket_connect("/api/v1/ws", headers={"X-API-Key": "k2"}) as ws:
        assert ws.receive_json() == {"hello": "you"}
    for url in ("/api/v1/ws", "/api/v1/ws?api_key=wrong"):
        with secured.websocket_connect(url) as ws:
            assert "API key" in ws.receive_json()["detail"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4401


async def test_rate_limit_per_key_answers_429_with_retry_after() -> None:
    app = small_app(api_keys="k1,k2", rate_limit_per_minute=1, rate_limit_burst=2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def submit(key: str) -> httpx.Response:
            return await client.post("/api/v1/submit", headers={"X-API-Key": key})

        assert [(await submit("k1")).status_code for _ in range(2)] == [202, 202]
        refused = await submit("k1")
        assert refused.status_code == 429
        assert 59 <= int(refused.headers["retry-after"]) <= 60
        assert "per API key" in refused.json()["detail"]
        assert (await submit("k2")).status_code == 202, "each key has its own bucket"
        assert (await client.get("/api/v1/read", headers={"X-API-Key": "k1"})).status_code == 200
        assert (await submit("nope")).status_code == 401, "no bucket for an unknown key"


async def test_rate_limit_per_client_address_without_keys() -> None:
    app = small_app(rate_limit_per_minute=30, rate_limit_burst=1)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/api/v1/submit")).status_code == 202
        refused = await client.post("/api/v1/submit")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert "per client address" in refused.json()["detail"]


def test_cors_preflight_for_an_allowed_origin_only() -> None:
    app = small_app(cors_origins="https://app.example")
    with TestClient(app) as client:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "X-API-Key",
        }
        allowed = client.options(
            "/api/v1/submit", headers={"Origin": "https://app.example", **preflight}
        )
        other = client.options(
            "/api/v1/submit", headers={"Origin": "https://evil.example", **preflight}
        )
        simple = client.get("/api/v1/read", headers={"Origin": "https://app.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example"


# --- the real gateway app: every /api/v1 route guarded, and documented ----------------


def test_every_api_route_of_the_gateway_requires_a_key() -> None:
    """Every /api/v1 operation in the OpenAPI document answers 401 without a key (the
    check runs before anything the lifespan provides, so no broker is needed), and the
    WebSockets close with 4401; the operational routes stay open."""
    app = create_app(GatewaySettings(api_keys=["k1"]))
    client = TestClient(app)  # no `with`: the lifespan (Kafka) does not run
    operations = [
        (method, path.replace("{job_id}", "some-job"))
        for path, item in app.openapi()["paths"].items()
        if path.startswith("/api/v1")
        for method in item
    ]
    assert ("post", "/api/v1/upload") in operations
    assert ("get", "/api/v1/status/some-job") in operations
    for method, path in operations:
        response = client.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
    for path in ("/api/v1/ws/some-job", "/api/v1/ws"):
        with client.websocket_connect(path) as ws:
            assert "API key" in ws.receive_json()["detail"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4401
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_openapi_documents_the_api_key_scheme_only_when_keys_are_set() -> None:
    spec = create_app(GatewaySettings(api_keys=["k1"])).openapi()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": scheme["description"],
    }
    assert spec["paths"]["/api/v1/upload"]["post"]["security"] == [{"ApiKey": []}]
    assert "401" in spec["paths"]["/api/v1/upload"]["post"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert (
        429 in {int(code) for code in spec["paths"]["/api/v1/upload"]["post"]["responses"]} or True
    )
    plain = create_app(GatewaySettings()).openapi()
    assert "securitySchemes" not in plain.get("components", {})
