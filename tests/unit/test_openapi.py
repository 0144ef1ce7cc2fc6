"""The OpenAPI document is the contract: every route lists each error it can answer (a
JSON `{"detail": ...}` with an example), and every body has an example. Read from the app
itself (no broker: the lifespan does not run)."""

from __future__ import annotations

from typing import Any

import pytest

from captionstream.gateway.app import create_app
from captionstream.settings import GatewaySettings

# (method, path) -> the error statuses it can answer (401 comes on top with API keys).
EXPECTED_ERRORS: dict[tuple[str, str], set[int]] = {
    ("post", "/api/v1/upload"): {400, 409, 413, 415, 422, 429, 503},
    ("post", "/api/v1/jobs"): {400, 409, 413, 415, 422, 429, 502, 503, 504},
    ("get", "/api/v1/status/{job_id}"): {404, 422},
    ("delete", "/api/v1/jobs/{job_id}"): {404, 409, 422, 503},
    ("get", "/api/v1/jobs/{job_id}/events"): {404, 422},
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {503},
    ("get", "/metrics"): set(),
}


def spec(**settings: object) -> dict[str, Any]:
    return create_app(GatewaySettings(**settings)).openapi()  # type: ignore[arg-type]


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return document["components"]["schemas"][ref.rsplit("/", 1)[-1]]  # type: ignore[no-any-return]


def has_example(document: dict[str, Any], media: dict[str, Any]) -> bool:
    if "example" in media or media.get("examples"):
        return True
    return bool(resolve(document, media.get("schema", {})).get("examples"))


@pytest.fixture(scope="module", params=[False, True], ids=["open", "api-keys"])
def document(request: pytest.FixtureRequest) -> dict[str, Any]:
    return spec(api_keys=["k1"]) if request.param else spec()


def test_the_table_covers_every_operation(document: dict[str, Any]) -> None:
    """A new route must say here which errors it answers."""
    assert set(operations(document)) == set(EXPECTED_ERRORS)


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED_ERRORS))
def test_each_route_documents_the_errors_it_can_answer(
    document: dict[str, Any], method: str, path: str
) -> None:
    keys_on = "ApiKey" in document.get("components", {}).get("securitySchemes", {})
    operation = operations(document)[method, path]
    documented = {int(code) for code in operation["responses"] if int(code) >= 400}
    expected = set(EXPECTED_ERRORS[method, path])
    if keys_on and path.startswith("/api/v1"):
        expected.add(401)
    assert documented == expected, f"{method.upper()} {path}"
    for code in documented:
        response = operation["responses"][str(code)]
        assert response.get("description"), (method, path, code)
        media = response["content"]["application/json"]
        schema = resolve(document, media["schema"])
        assert "detail" in schema["properties"], (method, path, code)
        assert has_example(document, media), f"{method.upper()} {path} {code}: no example"
        example = media.get("example") or resolve(document, media["schema"])["examples"][0]
        assert "detail" in example, (method, path, code)
    if 429 in documented:
        assert "Retry-After" in operation["responses"]["429"]["headers"]
    if 401 in documented:
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED_ERRORS))
def test_each_success_answer_has_an_example(
    document: dict[str, Any], method: str, path: str
) -> None:
    operation = operations(document)[method, path]
    successes = [code for code in operation["responses"] if 200 <= int(code) < 300]
    assert successes, (method, path)
    for code in successes:
        content = operation["responses"][code]["content"]
        for media_type, media in content.items():
            assert has_example(document, media), f"{method.upper()} {path} {code} {media_type}"


def test_request_bodies_have_examples_and_document_webhook_url(
    document: dict[str, Any],
) -> None:
    by_url = operations(document)["post", "/api/v1/jobs"]["requestBody"]["content"]
    media = by_url["application/json"]
    assert media["examples"], "named examples for /docs"
    assert any("webhook_url" in e["value"] for e in media["examples"].values())
    body = resolve(document, media["schema"])
    webhook_url = body["properties"]["webhook_url"]
    assert {"type": "string", "maxLength": 2048, "minLength": 1} in webhook_url["anyOf"]
    assert webhook_url["examples"]

    upload = operations(document)["post", "/api/v1/upload"]["requestBody"]["content"]
    form = resolve(document, upload["multipart/form-data"]["schema"])
    fields = resolve(document, form["allOf"][0]) if "allOf" in form else form
    for name in ("webhook_url", "max_new_tokens", "num_beams", "prompt"):
        assert name in fields["properties"], name
    assert fields["properties"]["webhook_url"]["examples"]


def test_a_missing_example_would_be_caught() -> None:
    """The check itself: an error response without an example fails it."""
    document = spec()
    operation = operations(document)["post", "/api/v1/upload"]
    del operation["responses"]["415"]["content"]["application/json"]["example"]
    media = operation["responses"]["415"]["content"]["application/json"]
    # ErrorResponse's field has an example, but the component has no `examples` list.
    assert not has_example(document, media)
