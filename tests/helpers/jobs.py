"""What clients see of a job."""

from __future__ import annotations

from captionstream.schemas.events import JobStatus

# The statuses a job ends in, as the status API and push channels spell them.
TERMINAL = frozenset(status.value for status in JobStatus if status.terminal)
