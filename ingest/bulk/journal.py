"""The output file as a resumable journal, and its sidecar of unfinished jobs.

A line with a terminal status (SUCCESS, FAILURE, REJECTED) means "done": a rerun skips
that path. Jobs submitted but not finished are appended to the sidecar
`FILE.jsonl.pending` (path, job id, sha256), so a rerun waits for those job ids instead
of submitting the images again. The sidecar is rewritten with what is still unfinished
when a run ends, and removed when nothing is.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from captionstream.ingest.bulk.files import BulkIngestError
from captionstream.schemas.events import JobState, JobStatus

log = logging.getLogger(__name__)

REJECTED = "REJECTED"
# Statuses that end an image's story in the journal: a rerun never redoes these paths.
DONE_STATUSES = frozenset({JobStatus.SUCCESS.value, JobStatus.FAILURE.value, REJECTED})


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A job submitted by an earlier (or this) run whose result is not in the output yet."""

    path: str
    job_id: str
    sha256: str

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "job_id": self.job_id, "sha256": self.sha256})


def pending_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".pending")


def _json_lines(text: str, what: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record
        else:
            log.warning("%s line %d is not a JSON object; ignoring it", what, number)


def parse_journal(text: str) -> dict[str, dict[str, Any]]:
    """path -> its line, for every path the output already has a terminal line for."""
    done: dict[str, dict[str, Any]] = {}
    for record in _json_lines(text, "output"):
        path, status = record.get("path"), record.get("status")
        if isinstance(path, str) and status in DONE_STATUSES:
            done.setdefault(path, record)
    return done


def parse_pending(text: str, done: Iterable[str] = ()) -> dict[str, PendingJob]:
    """path -> the job last submitted for it, for paths not done yet."""
    finished = set(done)
    pending: dict[str, PendingJob] = {}
    for record in _json_lines(text, "pending sidecar"):
        path, job_id, sha256 = record.get("path"), record.get("job_id"), record.get("sha256")
        if not (isinstance(path, str) and isinstance(job_id, str) and isinstance(sha256, str)):
            continue
        if path not in finished:
            pending[path] = PendingJob(path, job_id, sha256)
    return pending


def result_line(job: PendingJob, state: JobState) -> dict[str, Any]:
    """The output line of a job that reached a terminal state."""
    record: dict[str, Any] = {
        "path": job.path,
        "sha256": job.sha256,
        "job_id": job.job_id,
        "status": state.status.value,
    }
    if state.status is JobStatus.SUCCESS:
        record["caption"] = state.caption
    else:
        record["error"] = state.error
    return record


def rejected_line(path: str, error: str) -> dict[str, Any]:
    return {"path": path, "status": REJECTED, "error": error}


def _drop_torn_tail(path: Path) -> None:
    """A run killed mid-write can leave half a line at the end; cut it so that the next
    line starts on its own. (The torn line's job is still in the sidecar.)"""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s ends with a partial line; dropping it", path)
            fh.truncate(keep)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Journal:
    """The output file (results, appended and flushed line by line) and its sidecar of
    submitted-but-unfinished jobs (appended as jobs are accepted, compacted on close)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pending_path = pending_path_for(out)
        try:
            if out.exists():
                _drop_torn_tail(out)
            text = out.read_text(encoding="utf-8") if out.exists() else ""
            self.done = parse_journal(text)
            side = self.pending_path
            self.pending = parse_pending(
                side.read_text(encoding="utf-8") if side.exists() else "", self.done
            )
            self._out: IO[str] = out.open("a", encoding="utf-8")
            self._side: IO[str] = self.pending_path.open("a", encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkIngestError(f"cannot use {out} as the output: {exc}") from exc

    def record_result(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        self.done[record["path"]] = record
        self.pending.pop(record["path"], None)

    def record_submitted(self, job: PendingJob) -> None:
        self._side.write(job.to_json() + "\n")
        self._side.flush()
        self.pending[job.path] = job

    def close(self) -> None:
        """Close the output; leave a sidecar holding exactly the unfinished jobs, or none."""
        self._out.close()
        self._side.close()
        if self.pending:
            _atomic_write(
                self.pending_path, "".join(j.to_json() + "\n" for j in self.pending.values())
            )
        else:
            self.pending_path.unlink(missing_ok=True)
