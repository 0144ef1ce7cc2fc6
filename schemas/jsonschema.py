"""JSON Schema files for the public events, for consumers in any language.

`python -m captionstream.schemas.jsonschema` (or `make schemas`) regenerates `schemas/jsonschema/`;
a test fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from captionstream.schemas.events import CaptionFailed, CaptionProduced, ImageSubmitted, JobState
from captionstream.schemas.webhooks import JobFinishedWebhook

SCHEMA_DIR = Path(__file__).parent / "jsonschema"

PUBLIC_EVENTS: dict[str, type[BaseModel]] = {
    "caption.produced.v1": CaptionProduced,
    "caption.failed.v1": CaptionFailed,
    "job.state.v1": JobState,
    "image.submitted.v1": ImageSubmitted,
    "webhook.job.finished.v1": JobFinishedWebhook,
}


def render() -> dict[str, str]:
    """File name -> file text for every public event."""
    files = {}
    for name, model in PUBLIC_EVENTS.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"captionstream/{name}.schema.json",
            **model.model_json_schema(mode="serialization"),
        }
        files[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text)
        print(f"wrote {SCHEMA_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
