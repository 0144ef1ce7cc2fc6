"""Log output of every component: text for humans (default) or JSON for machines.

`CAPTIONSTREAM_LOG_FORMAT=json` writes one JSON object per line to stderr:
`{"ts", "level", "logger", "message"}`, plus `job_id` when the log call carries it
(`log.info(..., extra=job_context(job_id))`) and `exc` with the traceback of
`log.exception`. The same formatter is installed for the root logger, uvicorn (the
gateway) and Faust/mode (the worker), so nothing these libraries log bypasses it.

Whatever the format, API keys passed in a query string (`api_key=...`, WebSockets) are
masked in uvicorn's access lines.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes a log call may attach with `extra=`, copied into the JSON object when set.
CONTEXT_FIELDS = ("job_id",)

# Loggers whose records carry request paths (with their query strings).
ACCESS_LOGGERS = ("uvicorn.access", "uvicorn.error")


class LogFormat(enum.StrEnum):
    TEXT = "text"  # for humans: `TEXT_FORMAT`, and each library's own format
    JSON = "json"  # for machines: one JSON object per line, every logger alike


def job_context(job_id: str) -> dict[str, str]:
    """`extra=` for a log call about one job: JSON logs then carry its `job_id`."""
    return {"job_id": job_id}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class RedactQueryApiKey(logging.Filter):
    """Masks `api_key=<value>` in a record's message and arguments."""

    _PATTERN = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)

    def _redact(self, value: object) -> object:
        return self._PATTERN.sub(r"\1***", value) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) for arg in record.args)
        return True


def logging_dict_config(level: str | int, fmt: LogFormat) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the root logger: one stderr handler in `fmt`.

    Existing loggers stay enabled, and loggers without handlers of their own (uvicorn's
    when given no config, Faust's, mode's) reach this handler by propagation.
    """
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if fmt is LogFormat.JSON else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"captionstream": formatter},
        "handlers": {
            "captionstream": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "captionstream",
            }
        },
        "root": {"level": level, "handlers": ["captionstream"]},
    }


def configure_logging(level: str | int, fmt: LogFormat) -> None:
    """Set up the process's logging; call once, first thing, in every entry point."""
    logging.config.dictConfig(logging_dict_config(level, fmt))
    # `warnings.warn` (torch, transformers, ...) goes through logging too, so a JSON
    # log holds no stray plain-text lines.
    logging.captureWarnings(fmt is LogFormat.JSON)
    for name in ACCESS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryApiKey) for f in logger.filters):
            logger.addFilter(RedactQueryApiKey())


def uvicorn_log_config(fmt: LogFormat) -> dict[str, Any] | None:
    """`log_config` for `uvicorn.run`: its own colourful config for text; none for JSON,
    so its loggers propagate to the root handler `configure_logging` installed."""
    if fmt is LogFormat.JSON:
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG


def adopt_library_output(names: tuple[str, ...] = ("transformers", "huggingface_hub")) -> None:
    """For JSON logs: send what these libraries log through the root handler, and turn
    their progress bars off. Each installs a stderr handler of its own on import
    (transformers also stops propagation), and their tqdm bars write to stderr directly:
    both would put plain-text lines into a JSON log. Imports them (the worker uses them
    anyway)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()


def faust_logging_config(level: str | int, fmt: LogFormat) -> dict[str, Any] | None:
    """`logging_config` for `faust.Worker`, which replaces the root logger's handlers
    when it starts: for JSON, our handler again (else Faust's colour console format)."""
    if fmt is LogFormat.JSON:
        return logging_dict_config(level, fmt)
    return None
