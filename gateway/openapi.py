"""The error answers of the API, documented once: `responses=` entries for routes.

Every error is JSON `{"detail": ...}` (a string; for 422 the list of validation errors).
Each entry carries a description, the model, and an example, and 429 documents its
`Retry-After` header; `tests/unit/test_openapi.py` checks every route lists the errors it
can return.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from captionstream.schemas.api import ErrorResponse, ValidationErrorResponse

# status -> (when it is answered, an example detail)
ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "The request cannot be served as sent: not an acceptable image, or an image_url / "
        "webhook_url this service will not call.",
        "webhook_url refused: refusing to call 127.0.0.1: a loopback address",
    ),
    401: (
        "No valid API key (only when CAPTIONSTREAM_API_KEYS is set).",
        "no API key; send a valid one in the X-API-Key header",
    ),
    404: ("No such job (never existed, or expired).", "job '5b7a5c0e' not found"),
    409: (
        "Conflict: the Idempotency-Key was used for a different request, or the job is "
        "no longer PENDING.",
        "Idempotency-Key 'order-17' was already used for a different request",
    ),
    413: (
        "The image (or request body) is larger than the limits.",
        "image exceeds the limit of 5242880 bytes",
    ),
    415: ("Not an image of a supported format.", "not a supported image: image/svg+xml"),
    429: (
        "Over the submission rate limit; retry after `Retry-After` seconds.",
        "rate limit: 60 submissions per minute (bursts of 10) per API key; retry in 2 s",
    ),
    502: (
        "The image URL's server answered an error, or could not be reached.",
        "https://example.com/cat.jpg answered 404 Not Found",
    ),
    503: (
        "Kafka is unavailable: nothing was accepted; retry later.",
        "job not accepted, Kafka is unavailable: KafkaTimeoutError",
    ),
    504: (
        "The image URL's server was too slow.",
        "fetching https://example.com/cat.jpg took longer than 30s",
    ),
}

VALIDATION_EXAMPLE = {
    "detail": [
        {
            "loc": ["body", "options", "num_beams"],
            "msg": "Input should be less than or equal to 8",
            "type": "less_than_equal",
        }
    ]
}

HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {"description": "`APIKey`", "schema": {"type": "string"}},
    },
    429: {
        "Retry-After": {
            "description": "Seconds until the next submission will be accepted.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def error_responses(*codes: int, json_route: bool = True) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these status codes (422 included when listed).

    A route whose success is not JSON (`json_route=False`, e.g. Server-Sent Events) gets
    its errors as explicit `application/json` schema references: FastAPI would file a
    `model` under the route's own media type. (The models are in the components because
    the JSON routes use them; the OpenAPI test would fail otherwise.)
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        if code == 422:
            model: type[BaseModel] = ValidationErrorResponse
            description = "A field is missing, of the wrong type, or out of range."
            example: dict[str, Any] = VALIDATION_EXAMPLE
        else:
            model = ErrorResponse
            description, detail = ERRORS[code]
            example = {"detail": detail}
        media: dict[str, Any] = {"example": example}
        entry: dict[str, Any] = {"description": description, "content": {"application/json": media}}
        if json_route:
            entry["model"] = model
        else:
            media["schema"] = _ref(model)
        if code in HEADERS:
            entry["headers"] = HEADERS[code]
        responses[code] = entry
    return responses
