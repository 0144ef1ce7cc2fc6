"""Log output: the JSON formatter, the process-wide set-up, and the configs handed to
uvicorn and Faust (through mode's own `setup_logging`, as the worker does)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest
from mode.utils.logging import setup_logging as mode_setup_logging

from captionstream.logging_config import (
    JsonFormatter,
    LogFormat,
    RedactQueryApiKey,
    configure_logging,
    faust_logging_config,
    job_context,
    uvicorn_log_config,
)
from captionstream.settings import CommonSettings


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """These tests reconfigure the root logger; put pytest's set-up back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = [(name, logging.getLogger(name).filters[:]) for name in ("uvicorn.access",)]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, filters in access:
            logging.getLogger(name).filters[:] = filters
        logging.captureWarnings(False)


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("processor.pipeline", logging.WARNING, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def test_json_line_has_the_fields_and_the_job_id() -> None:
    line = JsonFormatter().format(record("job %s failed: %s", "j-1", "boom", **job_context("j-1")))
    entry = json.loads(line)
    assert entry == {
        "ts": entry["ts"],
        "level": "WARNING",
        "logger": "processor.pipeline",
        "message": "job j-1 failed: boom",
        "job_id": "j-1",
    }
    assert entry["ts"].endswith("+00:00")
    assert "T" in entry["ts"]


def test_json_line_without_a_job_has_no_job_id() -> None:
    entry = json.loads(JsonFormatter().format(record("hello")))
    assert "job_id" not in entry
    assert entry["message"] == "hello"


def test_json_stays_one_line_and_carries_the_traceback() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        made = record("two\nlines", job_id="j-2")
        made.exc_info = sys.exc_info()
    line = JsonFormatter().format(made)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines"
    assert "ValueError: bad" in entry["exc"]
    assert entry["job_id"] == "j-2"


def test_json_survives_values_json_cannot_encode() -> None:
    entry = json.loads(JsonFormatter().format(record("x", job_id=object())))
    assert entry["job_id"].startswith("<object object")


def test_configure_json_makes_every_logger_write_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", LogFormat.JSON)
    logging.getLogger("processor.pipeline").info(
        "job %s captioned", "j-3", extra=job_context("j-3")
    )
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("some.library").debug("below the level")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]  # every line is JSON
    assert [e["message"] for e in entries[:2]] == [
        "job j-3 captioned",
        "Started server process [42]",
    ]
    assert entries[0]["job_id"] == "j-3"
    assert entries[1]["logger"] == "uvicorn.error"
    assert "a library warning" in entries[2]["message"]
    assert entries[2]["logger"] == "py.warnings"
    assert len(entries) == 3


def test_configure_text_is_for_humans(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", LogFormat.TEXT)
    logging.getLogger("gateway").warning("job %s accepted", "j-4", extra=job_context("j-4"))
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING gateway job j-4 accepted")


def test_api_keys_in_query_strings_are_masked_in_access_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", LogFormat.TEXT)
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/api/v1/ws/j?api_key=s3cret&x=1"
    )
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "/api/v1/ws/j?api_key=***&x=1" in err


def test_redaction_leaves_other_records_alone() -> None:
    made = record("%s and %d", "nothing secret", 3)
    assert RedactQueryApiKey().filter(made)
    assert made.getMessage() == "nothing secret and 3"


def test_uvicorn_keeps_its_own_config_for_text_and_propagates_for_json() -> None:
    assert uvicorn_log_config(LogFormat.JSON) is None
    text = uvicorn_log_config(LogFormat.TEXT)
    assert text is not None
    assert "uvicorn.access" in text["loggers"]


def test_faust_set_up_with_our_config_keeps_json(capsys: pytest.CaptureFixture[str]) -> None:
    """What `faust.Worker` does when it starts (mode's `setup_logging` clears the root
    handlers and applies `logging_config`): the result still writes JSON."""
    assert faust_logging_config("INFO", LogFormat.TEXT) is None
    configure_logging("INFO", LogFormat.JSON)
    mode_setup_logging(loglevel="INFO", logging_config=faust_logging_config("INFO", LogFormat.JSON))
    logging.getLogger("faust.worker").info("[^Worker]: Ready")
    logging.getLogger("processor.pipeline").info("job j-5 captioned", extra=job_context("j-5"))
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["message"] for e in entries] == ["[^Worker]: Ready", "job j-5 captioned"]
    assert entries[1]["job_id"] == "j-5"
    assert len(logging.getLogger().handlers) == 1


def test_log_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONSTREAM_LOG_FORMAT", raising=False)
    assert CommonSettings().log_format is LogFormat.TEXT
    monkeypatch.setenv("CAPTIONSTREAM_LOG_FORMAT", "json")
    assert CommonSettings().log_format is LogFormat.JSON
