"""What a bulk run ingests: the images a directory, manifest or file names, as work items
keyed by absolute path, and reading one image file within the size limit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from captionstream.errors import CaptionstreamError, ImageTooLarge
from captionstream.ingest.validation import ALLOWED_EXTENSIONS
from captionstream.schemas.events import GenerationOptions


class BulkIngestError(CaptionstreamError):
    """A bad source, manifest or output file (not a bad image: those are REJECTED lines)."""


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One image to ingest: its absolute path (the journal key) and generation options."""

    path: str
    options: GenerationOptions = field(default_factory=GenerationOptions)


def absolute(path: str | Path, base: Path | None = None) -> str:
    """The journal key of a path: absolute and normalised, symlinks left as they are, so
    a rerun from another directory or with a relative path finds the same lines."""
    expanded = Path(os.path.expanduser(path))
    return os.path.abspath(expanded if base is None else base / expanded)


def scan_directory(root: Path) -> list[str]:
    """Files under `root` (recursively) whose extension names an image type, sorted.
    The extension only picks candidates: validation decodes each one and decides."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in ALLOWED_EXTENSIONS:
                found.append(absolute(Path(dirpath) / name))
    return found


def parse_text_manifest(text: str, base: Path, defaults: GenerationOptions) -> list[WorkItem]:
    """One path per line, relative to the manifest's directory; blank lines and lines
    starting with `#` are ignored."""
    items = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            items.append(WorkItem(absolute(entry, base), defaults))
    return items


def merge_options(defaults: GenerationOptions, overrides: object) -> GenerationOptions:
    """Per-image options over the run's defaults (a field set to null clears a default)."""
    if not isinstance(overrides, dict):
        raise ValueError('"options" must be a JSON object')
    return GenerationOptions.model_validate({**defaults.model_dump(exclude_none=True), **overrides})


def parse_jsonl_manifest(
    text: str, base: Path, defaults: GenerationOptions, name: str = "manifest"
) -> list[WorkItem]:
    """One JSON object per line: `{"path": "...", "options": {...}}` (options optional).
    Any mistake is an error naming the line: nothing is submitted from a bad manifest."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BulkIngestError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise BulkIngestError(f'{where}: expected an object like {{"path": "a.jpg"}}')
        unknown = set(record) - {"path", "options"}
        if unknown:
            raise BulkIngestError(f"{where}: unknown keys {sorted(unknown)}; use path, options")
        path = record.get("path")
        if not isinstance(path, str) or not path.strip():
            raise BulkIngestError(f'{where}: "path" must be a non-empty string')
        options = defaults
        if "options" in record:
            try:
                options = merge_options(defaults, record["options"])
            except (ValueError, ValidationError) as exc:
                raise BulkIngestError(f"{where}: bad options: {exc}") from exc
        items.append(WorkItem(absolute(path, base), options))
    return items


def dedupe(items: Iterable[WorkItem]) -> list[WorkItem]:
    """Each path once (the first entry wins), order kept."""
    seen: dict[str, WorkItem] = {}
    for item in items:
        seen.setdefault(item.path, item)
    return list(seen.values())


def discover(source: Path, defaults: GenerationOptions | None = None) -> list[WorkItem]:
    """The images named by `source`: a directory (recursive), a `.txt` or `.jsonl`
    manifest, or one image file."""
    defaults = defaults or GenerationOptions()
    if source.is_dir():
        items = [WorkItem(path, defaults) for path in scan_directory(source)]
    elif not source.exists():
        raise BulkIngestError(f"{source}: no such file or directory")
    elif source.suffix.lower() in (".txt", ".jsonl"):
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkIngestError(f"cannot read manifest {source}: {exc}") from exc
        base = Path(absolute(source)).parent
        if source.suffix.lower() == ".txt":
            items = parse_text_manifest(text, base, defaults)
        else:
            items = parse_jsonl_manifest(text, base, defaults, name=str(source))
    else:
        items = [WorkItem(absolute(source), defaults)]
    return dedupe(items)


def read_image_file(path: str, max_bytes: int) -> bytes:
    """The file's bytes; a file over the limit is refused without reading it."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise ImageTooLarge(f"image is {size} bytes; the limit is {max_bytes} bytes")
        return fh.read(max_bytes + 1)  # validation refuses it if it grew meanwhile
