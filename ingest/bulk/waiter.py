"""Which jobs a bulk run awaits, and when each one is finished.

Job states from the job-state topic are judged by `JobState.supersedes`, the rule the
gateway's view and webhooks use too, so bulk ingest never finishes a job differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from captionstream.ingest.bulk.journal import PendingJob
from captionstream.schemas.events import JobState


@dataclass(slots=True)
class _Awaited:
    job: PendingJob
    since: float
    holds_slot: bool
    state: JobState | None  # the state that won so far


class ResultWaiter:
    """The jobs this run waits for, fed with job states from the job-state topic.

    Each awaited job keeps the latest state that wins over the one held
    (`JobState.supersedes`); `on_done(job, state, holds_slot)` is called once per job,
    when that state is terminal. So the first terminal state is final, and a late state
    of an older job under the same id never finishes the awaited one.
    """

    def __init__(self, on_done: Callable[[PendingJob, JobState, bool], None]) -> None:
        self._on_done = on_done
        self._awaited: dict[str, _Awaited] = {}

    def __len__(self) -> int:
        return len(self._awaited)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._awaited

    def expect(
        self, job: PendingJob, now: float, holds_slot: bool = True, state: JobState | None = None
    ) -> None:
        """Await `job`. `state` is its state as this run publishes it, when known: states
        read before that one are then judged against the job's own submission time."""
        self._awaited[job.job_id] = _Awaited(job, now, holds_slot, state)

    def forget(self, job_id: str) -> None:
        self._awaited.pop(job_id, None)

    def apply(self, state: JobState) -> bool:
        """Take one job state; True if it finished an awaited job."""
        awaited = self._awaited.get(state.job_id)
        if awaited is None or not state.supersedes(awaited.state):
            return False
        awaited.state = state
        if not state.status.terminal:
            return False
        del self._awaited[state.job_id]
        self._on_done(awaited.job, state, awaited.holds_slot)
        return True

    def expire(self, now: float, timeout_s: float) -> list[tuple[PendingJob, bool]]:
        """Stop waiting for jobs awaited longer than `timeout_s`: (job, holds_slot)."""
        late = [a for a in self._awaited.values() if now - a.since > timeout_s]
        for awaited in late:
            del self._awaited[awaited.job.job_id]
        return [(a.job, a.holds_slot) for a in late]
