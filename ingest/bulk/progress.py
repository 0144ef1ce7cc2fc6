"""What a bulk run shows and answers: tqdm bars while it runs, a summary and exit code
when it ends."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from captionstream.ingest.bulk.journal import DONE_STATUSES, REJECTED


class Progress:
    """Two tqdm bars on stderr: images submitted and images finished, with rate and ETA.

    `enabled=None` shows them only when stderr is a terminal.
    """

    def __init__(
        self, *, to_submit: int, total: int, already_done: int, enabled: bool | None = None
    ) -> None:
        from tqdm import tqdm

        disable = None if enabled is None else not enabled
        self.counts: dict[str, int] = {s: 0 for s in sorted(DONE_STATUSES)}
        self.submitted_bar = tqdm(
            total=to_submit,
            desc="submitted",
            unit="img",
            position=0,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=disable,
        )
        self.finished_bar = tqdm(
            total=total,
            initial=already_done,
            desc="finished ",
            unit="img",
            position=1,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=disable,
        )

    def submitted(self) -> None:
        self.submitted_bar.update()

    def finished(self, status: str) -> None:
        self.counts[status] += 1
        self.finished_bar.set_postfix(
            ok=self.counts["SUCCESS"],
            failed=self.counts["FAILURE"],
            rejected=self.counts[REJECTED],
            refresh=False,
        )
        self.finished_bar.update()

    def close(self) -> None:
        self.submitted_bar.close()
        self.finished_bar.close()


@dataclass(slots=True)
class Summary:
    skipped: int = 0  # already done by an earlier run
    success: int = 0
    failure: int = 0
    rejected: int = 0
    timed_out: int = 0
    unfinished: int = 0  # left in the sidecar for a rerun
    interrupted_by: int | None = None  # the signal that stopped the run

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        return 1 if self.unfinished else 0
