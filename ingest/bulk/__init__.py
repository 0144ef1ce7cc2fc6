"""Bulk ingest: many local images straight to Kafka, results written as JSON lines.

`captionstream ingest SOURCE --out FILE.jsonl` submits every image of a directory, a
single file or a manifest with the same validation, blob store and events as the gateway,
follows the job-state topic for the results, and appends one line per image to
FILE.jsonl as each one finishes; the output file is the journal a rerun resumes from.

- `files`: what to ingest (directories, manifests) and reading one image file.
- `journal`: the output file and its sidecar of unfinished jobs.
- `waiter`: which jobs this run awaits, and when each is finished.
- `progress`: the progress bars and the run's summary.
- `runner`: the run itself, wired to Kafka (`run_bulk_ingest` is the command).
"""

from captionstream.ingest.bulk.files import (
    BulkIngestError,
    WorkItem,
    discover,
    parse_jsonl_manifest,
    parse_text_manifest,
    read_image_file,
)
from captionstream.ingest.bulk.journal import (
    Journal,
    PendingJob,
    parse_journal,
    parse_pending,
    pending_path_for,
    rejected_line,
    result_line,
)
from captionstream.ingest.bulk.progress import Progress, Summary
from captionstream.ingest.bulk.runner import run_bulk_ingest
from captionstream.ingest.bulk.waiter import ResultWaiter

__all__ = [
    "BulkIngestError",
    "Journal",
    "PendingJob",
    "Progress",
    "ResultWaiter",
    "Summary",
    "WorkItem",
    "discover",
    "parse_journal",
    "parse_jsonl_manifest",
    "parse_pending",
    "parse_text_manifest",
    "pending_path_for",
    "read_image_file",
    "rejected_line",
    "result_line",
    "run_bulk_ingest",
]
