"""What a bench run shows while it runs (progress on stderr) and the report it ends with."""

from __future__ import annotations

import sys
import time
from pathlib import Path

_started = time.monotonic()


def elapsed_s() -> float:
    """Seconds since the run started."""
    return time.monotonic() - _started


def progress(message: str) -> None:
    """`[mm:ss] message` on stderr: minutes into the run."""
    elapsed = int(elapsed_s())
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def publish_report(text: str, output: str) -> None:
    """Print the report, and write it to `output` unless that is `-`."""
    print(text)
    if output != "-":
        Path(output).write_text(text)
        progress(f"written to {output}")
