"""Whole stages in the driver, one after another: SQLite takes one writer at a time anyway.

Each stage is one batch (batch_index=None: ultrack walks every frame, and solve windows even then
odd, itself). With n_workers=1 no process pool is spawned, and neither the ~5 s ultrack import nor
the per-call set-up is paid per batch."""

from __future__ import annotations

import traceback
from collections.abc import Sequence

from gridsearch.core.errors import one_line
from gridsearch.core.files import tail
from gridsearch.executors.base import Events, Executor, ExecutorContext, StageFailed, StageJob
from gridsearch.runtime import fd_redirect
from gridsearch.worker import run_and_acknowledge


class InProcessExecutor(Executor):
    def __init__(self, ctx: ExecutorContext) -> None:
        super().__init__(ctx)
        self.log = ctx.ws.logs / "ultrack.log"

    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        reported: set[tuple[int, int]] = set()
        for job in jobs:
            events.stage_started(job.stage, 1)
            try:
                with fd_redirect(self.log):
                    run_and_acknowledge(self.task(job, None), self.ctx.ledger.engine)
            except Exception as e:
                with open(self.log, "a") as f:
                    f.write(traceback.format_exc())
                raise StageFailed(job.stage, None, one_line(e), self.log, tail(self.log)) from e
            if 0 not in self.report_acknowledged([job], reported, events)[job.run_id]:
                raise StageFailed(job.stage, None, "finished without acknowledging", self.log)
            events.stage_done(job.stage)
