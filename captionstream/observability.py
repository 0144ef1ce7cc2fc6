"""What the gateway's and the processor's metrics share."""

from __future__ import annotations

# Submission to terminal state: from tens of milliseconds (tiny model, idle) to minutes
# (queued behind a backlog, retries with backoff).
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
