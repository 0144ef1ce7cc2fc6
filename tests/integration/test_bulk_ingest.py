"""`captionstream ingest` and `captionstream tail` as users run them: real CLI processes
against the session's embedded broker and worker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captionstream.schemas.events import (
    CaptionProduced,
    EventDecodeError,
    decode_caption_event,
    decode_image_submitted,
)
from captionstream.schemas.topics import TOPICS
from tests.integration.stack import Component, Stack, read_topic, wait_until

CLI = [sys.executable, "-m", "captionstream"]


def unique_image(path: Path, fmt: str = "PNG") -> Path:
    """A small image no other test submits (random pixels: its own sha256)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (24, 24), os.urandom(24 * 24 * 3)).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingest(stack: Stack, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*CLI, "ingest", *args],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"`captionstream ingest` still running after {timeout_s}s:\n{stderr}")


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def image_events_per_sha(stack: Stack) -> Counter[str]:
    """Image events on the session's images topic, by image content. Other tests publish
    malformed records there on purpose (dead-letter tests): those are not events."""
    records = await read_topic(stack.bootstrap, TOPICS.images.name, timeout_s=10)
    found: Counter[str] = Counter()
    for _, value in records:
        with contextlib.suppress(EventDecodeError):
            found[decode_image_submitted(value).sha256] += 1
    return found


def test_a_directory_is_captioned_and_a_fake_image_rejected(
    stack: Stack, worker: Component, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    valid = [unique_image(images / f"{i:02}.png") for i in range(8)]
    valid += [unique_image(images / "nested" / f"{i}.jpg", "JPEG") for i in range(4)]
    fake = images / "nested" / "fake.jpg"
    fake.write_text("this is a text file, not a JPEG")
    out = tmp_path / "captions.jsonl"

    run = ingest(stack, str(images), "--out", str(out), "--options-json", '{"max_new_tokens": 8}')
    assert run.returncode == 0, run.stderr[-3000:]
    lines = lines_of(out)
    assert len(lines) == 13, lines
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {str(p) for p in [*valid, fake]}

    rejected = by_path[str(fake)]
    assert rejected["status"] == "REJECTED"
    assert set(rejected) == {"path", "status", "error"}
    assert isinstance(rejected["error"], str)
    assert rejected["error"]
    for path in valid:
        line = by_path[str(path)]
        assert line["status"] == "SUCCESS", line
        assert set(line) == {"path", "sha256", "job_id", "status", "caption"}
        assert line["sha256"] == sha256_of(path)
        assert isinstance(line["caption"], str)
    assert len({by_path[str(p)]["job_id"] for p in valid}) == 12
    assert not Path(f"{out}.pending").exists(), "nothing unfinished, no sidecar"

    # Rerunning a finished run submits nothing and writes nothing.
    again = ingest(stack, str(images), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert lines_of(out) == lines
    events = asyncio.run(image_events_per_sha(stack))
    assert all(events[sha256_of(p)] == 1 for p in valid)


def test_ctrl_c_then_rerun_finishes_without_redoing_anything(
    stack: Stack, worker: Component, tmp_path: Path
) -> None:
    images = [unique_image(tmp_path / "images" / f"{i:02}.png") for i in range(10)]
    out = tmp_path / "captions.jsonl"
    sidecar = Path(f"{out}.pending")
    args = [str(tmp_path / "images"), "--out", str(out)]

    # One image at a time, so that Ctrl-C lands half-way with a job in flight.
    log_path = tmp_path / "first-run.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(
            [*CLI, "ingest", *args, "--concurrency", "1"],
            env=stack.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: len(lines_of(out)) >= 2 or first.poll() is not None, 60, "2 results")
        first.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert first.wait(30) == 130, log_path.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    interrupted = lines_of(out)
    assert 2 <= len(interrupted) < len(images), "the run was interrupted half-way"
    assert all(line["status"] == "SUCCESS" for line in interrupted)
    # An accepted but unfinished job is kept for the rerun (concurrency 1: at most one).
    kept = {entry["path"]: entry["job_id"] for entry in lines_of(sidecar)}
    assert len(kept) <= 1
    assert not set(kept) & {line["path"] for line in interrupted}

    rerun = ingest(stack, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = lines_of(out)
    assert lines[: len(interrupted)] == interrupted, "finished lines are kept as they were"
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in images)
    assert all(line["status"] == "SUCCESS" for line in lines)
    by_path = {line["path"]: line for line in lines}
    assert all(by_path[path]["job_id"] == job_id for path, job_id in kept.items())
    assert not sidecar.exists()

    # A run killed outright between submitting and finishing (simulated): the sidecar
    # names the jobs, and the rerun waits for those instead of submitting again.
    out.write_text("".join(json.dumps(line) + "\n" for line in lines[:-3]))
    sidecar.write_text(
        "".join(
            json.dumps({k: line[k] for k in ("path", "job_id", "sha256")}) + "\n"
            for line in lines[-3:]
        )
    )
    resumed = ingest(stack, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(lines_of(out), key=lambda x: x["path"]) == sorted(lines, key=lambda x: x["path"])

    # Each image went onto the images topic exactly once over the three runs.
    events = asyncio.run(image_events_per_sha(stack))
    assert [events[sha256_of(p)] for p in images] == [1] * len(images)


def test_tail_prints_new_caption_events_and_the_topic_from_the_beginning(
    stack: Stack, worker: Component, tmp_path: Path
) -> None:
    # One caption older than the tail, so that the topic holds at least three events
    # whichever tests ran before on this stack (none may have).
    unique_image(tmp_path / "earlier" / "0.png")
    earlier = ingest(stack, str(tmp_path / "earlier"), "--out", str(tmp_path / "earlier.jsonl"))
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    log_path = tmp_path / "tail.log"
    with open(log_path, "wb") as log:
        tail = subprocess.Popen(
            [*CLI, "tail", "--max", "2"],
            env=stack.env(),
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        wait_until(
            lambda: "from the end" in log_path.read_text() or tail.poll() is not None,
            30,
            "tail to start reading",
        )
        images = [unique_image(tmp_path / "images" / f"{i}.png") for i in range(2)]
        out = tmp_path / "captions.jsonl"
        run = ingest(stack, str(tmp_path / "images"), "--out", str(out))
        assert run.returncode == 0, run.stderr[-3000:]
        stdout, _ = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0, log_path.read_text()[-3000:]
    events = [decode_caption_event(line) for line in stdout.decode().splitlines()]
    assert all(isinstance(event, CaptionProduced) for event in events)
    # From the end: only the events of this ingest, nothing older.
    assert {e.job_id for e in events} == {line["job_id"] for line in lines_of(out)}
    assert {e.sha256 for e in events if isinstance(e, CaptionProduced)} == {
        sha256_of(p) for p in images
    }

    beginning = subprocess.run(
        [*CLI, "tail", "--from-beginning", "--max", "3"],
        env=stack.env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert beginning.returncode == 0, beginning.stderr[-3000:]
    lines = beginning.stdout.decode().splitlines()
    assert len(lines) == 3
    for line in lines:
        decode_caption_event(line)  # raises if not a valid caption event
