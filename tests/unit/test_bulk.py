"""Bulk ingest without a broker: what gets ingested (directories, manifests), the journal
that makes a rerun resume, the list of awaited jobs, and `captionstream tail`'s lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from captionstream.cli import build_parser
from captionstream.errors import ImageTooLarge
from captionstream.ingest.bulk import (
    BulkIngestError,
    Journal,
    PendingJob,
    Progress,
    ResultWaiter,
    Summary,
    WorkItem,
    discover,
    parse_journal,
    parse_jsonl_manifest,
    parse_pending,
    parse_text_manifest,
    pending_path_for,
    read_image_file,
    rejected_line,
    result_line,
)
from captionstream.schemas.events import GenerationOptions, JobState, JobStatus
from captionstream.tail import event_line

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SHA = "a" * 64


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def state(job_id: str, status: JobStatus, **changes: object) -> JobState:
    return JobState.pending(job_id, T0).model_copy(update={"status": status, **changes})


# --- what to ingest ---------------------------------------------------------------------


def test_a_directory_yields_image_files_recursively_sorted_and_absolute(tmp_path: Path) -> None:
    touch(tmp_path / "b.png")
    touch(tmp_path / "a.JPG")
    touch(tmp_path / "sub" / "deeper" / "c.webp")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "no_extension")
    items = discover(tmp_path)
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in items] == [
        "a.JPG",
        "b.png",
        "sub/deeper/c.webp",
    ]
    assert all(Path(i.path).is_absolute() for i in items)
    assert all(i.options == GenerationOptions() for i in items)


def test_a_single_file_is_one_item_whatever_its_name(tmp_path: Path) -> None:
    # Validation decides later; a single named file is always tried.
    path = touch(tmp_path / "photo.data")
    assert discover(path) == [WorkItem(str(path))]


def test_paths_are_the_same_journal_key_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "imgs" / "a.png")
    monkeypatch.chdir(tmp_path)
    relative = discover(Path("imgs"))
    monkeypatch.chdir(tmp_path / "imgs")
    assert discover(Path("../imgs")) == relative == discover(tmp_path / "imgs")


def test_text_manifest_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    text = "# a comment\n\nimgs/a.png\n  /abs/b.jpg  \nimgs/../c.png\n"
    items = parse_text_manifest(text, tmp_path, GenerationOptions(num_beams=2))
    assert [i.path for i in items] == [
        str(tmp_path / "imgs" / "a.png"),
        "/abs/b.jpg",
        str(tmp_path / "c.png"),
    ]
    assert all(i.options == GenerationOptions(num_beams=2) for i in items)


def test_jsonl_manifest_options_override_the_run_defaults(tmp_path: Path) -> None:
    defaults = GenerationOptions(max_new_tokens=20, prompt="a photo of")
    text = "\n".join(
        [
            json.dumps({"path": "a.png"}),
            "",
            json.dumps({"path": "b.png", "options": {"num_beams": 3}}),
            json.dumps({"path": "c.png", "options": {"prompt": None, "max_new_tokens": 5}}),
        ]
    )
    a, b, c = parse_jsonl_manifest(text, tmp_path, defaults)
    assert a == WorkItem(str(tmp_path / "a.png"), defaults)
    assert b.options == GenerationOptions(max_new_tokens=20, prompt="a photo of", num_beams=3)
    assert c.options == GenerationOptions(max_new_tokens=5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "m.jsonl:2: not JSON"),
        ('["a.png"]', "m.jsonl:2: expected an object"),
        ('{"options": {}}', 'm.jsonl:2: "path" must be'),
        ('{"path": ""}', 'm.jsonl:2: "path" must be'),
        ('{"path": "a.png", "option": {}}', "m.jsonl:2: unknown keys ['option']"),
        ('{"path": "a.png", "options": {"num_beams": 99}}', "m.jsonl:2: bad options"),
        ('{"path": "a.png", "options": {"beams": 2}}', "m.jsonl:2: bad options"),
        ('{"path": "a.png", "options": 3}', "m.jsonl:2: bad options"),
    ],
)
def test_a_bad_manifest_line_is_an_error_naming_the_line(
    tmp_path: Path, line: str, message: str
) -> None:
    text = json.dumps({"path": "ok.png"}) + "\n" + line + "\n"
    with pytest.raises(BulkIngestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_jsonl_manifest(text, tmp_path, GenerationOptions(), name="m.jsonl")


def test_discover_reads_manifests_by_suffix_and_drops_repeated_paths(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.png\nb.png\na.png\n")
    (tmp_path / "list.jsonl").write_text(
        '{"path": "a.png", "options": {"num_beams": 2}}\n{"path": "a.png"}\n'
    )
    assert [Path(i.path).name for i in discover(tmp_path / "list.txt")] == ["a.png", "b.png"]
    [only] = discover(tmp_path / "list.jsonl")
    assert only.options.num_beams == 2  # the first entry of a path wins


def test_a_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BulkIngestError, match="no such file"):
        discover(tmp_path / "nope")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = touch(tmp_path / "big.png", b"\0" * 101)
    with pytest.raises(ImageTooLarge, match="101 bytes; the limit is 100"):
        read_image_file(str(path), 100)
    assert read_image_file(str(path), 101) == b"\0" * 101


# --- the journal ------------------------------------------------------------------------


def test_only_terminal_lines_count_as_done() -> None:
    lines = [
        {"path": "/a", "status": "SUCCESS", "caption": "x"},
        {"path": "/b", "status": "FAILURE", "error": "boom"},
        {"path": "/c", "status": "REJECTED", "error": "not an image"},
        {"path": "/d", "status": "PENDING"},
        {"status": "SUCCESS"},
        {"path": "/a", "status": "FAILURE", "error": "a later duplicate"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n[1]\n"
    done = parse_journal(text)
    assert set(done) == {"/a", "/b", "/c"}
    assert done["/a"]["status"] == "SUCCESS"


def test_pending_keeps_the_last_job_of_each_path_that_is_not_done() -> None:
    lines = [
        PendingJob("/a", "j1", SHA).to_json(),
        PendingJob("/b", "j2", SHA).to_json(),
        PendingJob("/a", "j3", SHA).to_json(),
        json.dumps({"path": "/c", "job_id": 7, "sha256": SHA}),
        PendingJob("/d", "j4", SHA).to_json(),
    ]
    pending = parse_pending("\n".join(lines) + '\n{"path": "/e", "job', done=["/d"])
    assert pending == {"/a": PendingJob("/a", "j3", SHA), "/b": PendingJob("/b", "j2", SHA)}


def test_result_lines() -> None:
    job = PendingJob("/imgs/a.png", "j1", SHA)
    assert result_line(job, state("j1", JobStatus.SUCCESS, caption="a cat")) == {
        "path": "/imgs/a.png",
        "sha256": SHA,
        "job_id": "j1",
        "status": "SUCCESS",
        "caption": "a cat",
    }
    failed = result_line(job, state("j1", JobStatus.FAILURE, error="image unreadable"))
    assert failed["status"] == "FAILURE"
    assert failed["error"] == "image unreadable"
    assert "caption" not in failed
    assert rejected_line("/x.jpg", "not an image") == {
        "path": "/x.jpg",
        "status": "REJECTED",
        "error": "not an image",
    }


def test_journal_round_trip_resumes_where_a_run_stopped(tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    journal = Journal(out)
    assert journal.done == {}
    assert journal.pending == {}
    for job in (PendingJob("/a", "j1", SHA), PendingJob("/b", "j2", SHA)):
        journal.record_submitted(job)
    journal.record_result(result_line(journal.pending["/a"], state("j1", JobStatus.SUCCESS)))
    journal.record_result(rejected_line("/c", "not an image"))
    journal.close()

    # The sidecar holds exactly what is unfinished.
    assert pending_path_for(out).read_text().splitlines() == [PendingJob("/b", "j2", SHA).to_json()]
    again = Journal(out)
    assert set(again.done) == {"/a", "/c"}
    assert again.pending == {"/b": PendingJob("/b", "j2", SHA)}
    again.record_result(result_line(again.pending["/b"], state("j2", JobStatus.FAILURE)))
    again.close()
    assert not pending_path_for(out).exists(), "nothing unfinished: no sidecar"
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["/a", "/c", "/b"]


def test_a_sidecar_left_by_a_killed_run_still_resumes(tmp_path: Path) -> None:
    # SIGKILL: no compaction, the sidecar still lists jobs whose results were written.
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "/a", "status": "SUCCESS", "caption": "x"}) + "\n")
    pending_path_for(out).write_text(
        PendingJob("/a", "j1", SHA).to_json() + "\n" + PendingJob("/b", "j2", SHA).to_json() + "\n"
    )
    journal = Journal(out)
    assert journal.pending == {"/b": PendingJob("/b", "j2", SHA)}
    journal.close()


def test_a_torn_last_line_is_dropped_before_appending(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = json.dumps({"path": "/a", "status": "SUCCESS", "caption": "x"})
    out.write_text(good + "\n" + '{"path": "/b", "sta')
    journal = Journal(out)
    assert set(journal.done) == {"/a"}
    journal.record_result(rejected_line("/b", "not an image"))
    journal.close()
    lines = out.read_text().splitlines()
    assert lines[0] == good
    assert [json.loads(line)["path"] for line in lines] == ["/a", "/b"]


def test_an_unwritable_output_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BulkIngestError, match="cannot use"):
        Journal(tmp_path / "missing-dir" / "out.jsonl")


# --- waiting for results ----------------------------------------------------------------


def test_the_waiter_reports_the_first_terminal_state_of_awaited_jobs_only() -> None:
    done: list[tuple[str, JobStatus, bool]] = []
    waiter = ResultWaiter(lambda job, st, slot: done.append((job.path, st.status, slot)))
    waiter.expect(PendingJob("/a", "j1", SHA), now=0)
    waiter.expect(PendingJob("/b", "j2", SHA), now=0, holds_slot=False)
    assert len(waiter) == 2
    assert "j1" in waiter

    assert not waiter.apply(state("j1", JobStatus.STARTED))
    assert not waiter.apply(state("other", JobStatus.SUCCESS))
    assert waiter.apply(state("j1", JobStatus.SUCCESS))
    assert not waiter.apply(state("j1", JobStatus.FAILURE)), "the first terminal state is final"
    assert waiter.apply(state("j2", JobStatus.FAILURE))
    assert done == [("/a", JobStatus.SUCCESS, True), ("/b", JobStatus.FAILURE, False)]
    assert len(waiter) == 0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job_states(job_id: str, submitted_s: float, finished_s: float) -> tuple[JobState, ...]:
    """PENDING, STARTED and SUCCESS of one job submitted and finished at those times."""
    pending = JobState.pending(job_id, at(submitted_s))
    started = pending.advance(JobStatus.STARTED, updated_at=at(submitted_s + 1))
    success = started.advance(
        JobStatus.SUCCESS,
        caption=f"finished at {finished_s}",
        updated_at=at(finished_s),
        finished_at=at(finished_s),
    )
    return pending, started, success


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "from-the-topic"])
def test_the_waiter_ignores_a_late_terminal_state_of_an_older_job_under_the_same_id(
    seeded: bool,
) -> None:
    # An id reused for a new job (e.g. a derived id): the older job's terminal state,
    # finished before the awaited job was submitted, is read late and must not finish it.
    done: list[JobState] = []
    waiter = ResultWaiter(lambda job, st, slot: done.append(st))
    *_, older_success = job_states("j1", submitted_s=0, finished_s=10)
    pending, started, success = job_states("j1", submitted_s=100, finished_s=110)
    waiter.expect(PendingJob("/a", "j1", SHA), now=0, state=pending if seeded else None)
    if not seeded:
        assert not waiter.apply(pending)

    assert not waiter.apply(older_success)
    assert "j1" in waiter
    assert not waiter.apply(started)
    assert not waiter.apply(older_success)
    assert waiter.apply(success)
    assert done == [success]
    assert len(waiter) == 0


def test_the_waiter_keeps_the_first_terminal_state_and_ignores_later_ones() -> None:
    # A redelivered job can finish twice; the first result is the job's result.
    done: list[JobState] = []
    waiter = ResultWaiter(lambda job, st, slot: done.append(st))
    pending, started, first = job_states("j1", submitted_s=0, finished_s=10)
    again = started.advance(JobStatus.FAILURE, error="redelivered", finished_at=at(20))
    waiter.expect(PendingJob("/a", "j1", SHA), now=0, state=pending)
    assert not waiter.apply(pending), "the PENDING state this run published is no news"
    assert not waiter.apply(started)
    assert waiter.apply(first)
    assert not waiter.apply(again)
    assert not waiter.apply(first)
    assert done == [first]


def test_the_waiter_gives_up_on_late_jobs_and_forgets_unpublished_ones() -> None:
    waiter = ResultWaiter(lambda job, st, slot: None)
    waiter.expect(PendingJob("/a", "j1", SHA), now=0)
    waiter.expect(PendingJob("/b", "j2", SHA), now=5, holds_slot=False)
    waiter.expect(PendingJob("/c", "j3", SHA), now=0)
    waiter.forget("j3")
    assert waiter.expire(now=10, timeout_s=10) == []
    assert waiter.expire(now=10.5, timeout_s=10) == [(PendingJob("/a", "j1", SHA), True)]
    assert waiter.expire(now=16, timeout_s=10) == [(PendingJob("/b", "j2", SHA), False)]
    assert len(waiter) == 0


# --- the command ------------------------------------------------------------------------


def test_exit_codes() -> None:
    assert Summary(success=3, failure=1, rejected=1).exit_code == 0
    assert Summary(success=3, unfinished=2).exit_code == 1
    assert Summary(success=1, unfinished=2, interrupted_by=2).exit_code == 130


def test_progress_bars_show_submitted_and_finished_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bars = Progress(to_submit=2, total=5, already_done=3, enabled=True)
    bars.submitted()
    bars.finished("SUCCESS")
    bars.submitted()
    bars.finished("REJECTED")
    bars.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "submitted: 100%" in captured.err
    assert "5/5" in captured.err
    assert "rejected=1" in captured.err


def test_cli_arguments() -> None:
    args = build_parser().parse_args(
        ["ingest", "imgs", "--out", "o.jsonl", "--concurrency", "4", "--timeout", "2.5"]
    )
    assert (args.source, args.out, args.concurrency, args.timeout) == (
        Path("imgs"),
        Path("o.jsonl"),
        4,
        2.5,
    )
    assert args.options_json is None
    assert args.progress == "auto"
    tail = build_parser().parse_args(["tail", "--from-beginning", "--max", "3"])
    assert (tail.from_beginning, tail.max) == (True, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "imgs", "--out", "o", "--concurrency", "0"])


# --- tail -------------------------------------------------------------------------------


def test_tail_prints_events_as_published_and_skips_what_is_not_an_event() -> None:
    raw = b'{"type":"caption.produced","caption":"a cat"}'
    assert event_line(raw) == raw.decode()
    assert event_line(None) is None
    assert event_line(b"\xff\xfe") is None
    assert event_line(b"not json") is None
    assert event_line(b"[1, 2]") is None
    assert event_line(b'{\n  "type": "x"\n}') == '{"type": "x"}'
