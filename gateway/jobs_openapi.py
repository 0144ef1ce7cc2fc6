"""What the OpenAPI document says about the jobs routes beyond their types: the errors
each can answer, its success response (headers, non-JSON bodies) and request examples.

The error entries themselves come from `gateway.openapi`; `tests/unit/test_openapi.py`
checks that each route lists the errors it can answer.
"""

from __future__ import annotations

from typing import Any

from captionstream.gateway.openapi import error_responses

# What each route can answer besides its success (401 is added for every /api/v1 route
# when API keys are on; see gateway.security.api_router_options).
UPLOAD_ERRORS = (400, 409, 413, 415, 422, 429, 503)
URL_ERRORS = (400, 409, 413, 415, 422, 429, 502, 503, 504)
STATUS_ERRORS = (404, 422)
CANCEL_ERRORS = (404, 409, 422, 503)
EVENTS_ERRORS = (404, 422)

LOCATION_HEADER = {
    "Location": {"description": "The job's status URL.", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when an Idempotency-Key retry returned the earlier job.",
        "schema": {"type": "string"},
    },
}
ACCEPTED = {"description": "The job was accepted.", "headers": LOCATION_HEADER}

STATUS_OK = {
    "description": "The job's current status (after `wait`, the status it reached).",
    "headers": {
        "Retry-After": {
            "description": "Only while the job is unfinished (PENDING, STARTED, RETRY): "
            "seconds to wait before asking again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}

EVENTS_OK = {
    "description": "Server-Sent Events: one `status` event per state.",
    "content": {
        "text/event-stream": {
            "schema": {"type": "string"},
            "example": "event: status\nid: 2025-01-01T12:00:02+00:00\n"
            'data: {"job_id": "5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5", "status": "SUCCESS", '
            '"result": {"caption": "a cat"}}\n\n',
        }
    },
}

UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: ACCEPTED,
    **error_responses(*UPLOAD_ERRORS),
}
URL_RESPONSES: dict[int | str, dict[str, Any]] = {202: ACCEPTED, **error_responses(*URL_ERRORS)}
STATUS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: STATUS_OK,
    **error_responses(*STATUS_ERRORS),
}
CANCEL_RESPONSES = error_responses(*CANCEL_ERRORS)
EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: EVENTS_OK,
    **error_responses(*EVENTS_ERRORS, json_route=False),
}

URL_EXAMPLES = {
    "plain": {
        "summary": "Just an image URL",
        "value": {"image_url": "https://example.com/cat.jpg"},
    },
    "options and webhook": {
        "summary": "Generation options and a webhook",
        "value": {
            "image_url": "https://example.com/cat.jpg",
            "options": {"max_new_tokens": 40, "num_beams": 3, "prompt": "a photo of"},
            "webhook_url": "https://hooks.example.com/captionstream",
        },
    },
}
