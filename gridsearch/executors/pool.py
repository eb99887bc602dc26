"""N long-lived worker processes, each what a SLURM array task is: a separate database client.

ultrack's import costs ~4-5 s (torch), more than a stage on a small movie: each worker pays it
once per sweep, not per batch. The password reaches them only through the environment
(PGPASSWORD), never argv. A batch counts as done when its acknowledgement is in the ledger."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO

from gridsearch.core.files import tail
from gridsearch.executors.base import Events, Executor, ExecutorContext, StageFailed, StageJob


class _Worker:
    def __init__(self, idx: int, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._logf: IO[bytes] = open(log, "ab")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridsearch.worker", "--serve", "--parent", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._logf,
            env=env,
            text=True,
            bufsize=1,
        )
        self.idx = idx
        self.busy: int | None = None
        self.ready = False

    def send(self, task: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise _WorkerDied(f"worker process exited with code {self.proc.wait()}")
        return json.loads(line)

    def hang_up(self) -> None:
        """End of input: the worker finishes its batch, if any, and exits."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def close(self) -> None:
        self.hang_up()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


class PoolExecutor(Executor):
    def __init__(self, ctx: ExecutorContext) -> None:
        super().__init__(ctx)
        self.n = ctx.sweep.executor.workers
        self.log_dir = ctx.ws.logs
        self.env = {**os.environ, **ctx.backend.env}
        self.workers: list[_Worker] = []
        self.sel = selectors.DefaultSelector()
        self._next_id = 0

    def _start(self) -> None:
        """Top the pool up to N (after a worker died, the whole pool was stopped)."""
        for i in range(len(self.workers), self.n):
            w = _Worker(i, self.env, self.log_dir / f"worker-{i}.log")
            assert w.proc.stdout is not None
            self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            self.workers.append(w)

    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        self._start()
        reported: set[tuple[int, int]] = set()
        for job in jobs:
            events.stage_started(job.stage, job.n_batches)
            for phase in job.phases:
                self._run_phase(job, phase, events, reported)
            events.stage_done(job.stage)

    def _dispatch(self, job: StageJob, queue: list[int], running: dict[int, int]) -> None:
        for w in self.workers:
            if w.ready and w.busy is None and queue:
                batch = queue.pop(0)
                self._next_id += 1
                w.busy, running[self._next_id] = self._next_id, batch
                w.send({"id": self._next_id, "task": asdict(self.task(job, batch))})

    def _run_phase(self, job: StageJob, phase: list[int], events: Events,
                   reported: set[tuple[int, int]]) -> None:
        """Batches of one phase on the pool; on the first failure, stop dispatching and let the
        running ones finish (their acknowledgements are kept), then raise."""
        queue = list(phase)
        running: dict[int, int] = {}  # message id -> batch
        failure: StageFailed | None = None
        while queue or running:
            if failure is None:
                self._dispatch(job, queue, running)
            elif not running:
                break
            for key, _ in self.sel.select(timeout=1.0):
                failure = self._receive(key.data, job, running, failure)
            self.report_acknowledged([job], reported, events)
        if failure is not None:
            raise failure
        missing = set(phase) - self.ctx.ledger.acked([job.run_id])[job.run_id]
        if missing:
            raise StageFailed(job.stage, min(missing), "the worker replied without acknowledging")

    def _receive(self, w: _Worker, job: StageJob, running: dict[int, int],
                 failure: StageFailed | None) -> StageFailed | None:
        try:
            msg = w.read()
        except _WorkerDied as e:
            batch = running.pop(w.busy, None) if w.busy is not None else None
            # The survivors may be writing: stop them all before the engine clears the database.
            self.close()
            raise StageFailed(job.stage, batch, e.reason, w.log, tail(w.log)) from None
        if "ready" in msg:
            w.ready = True
            return failure
        batch = running.pop(int(msg["id"]), None)  # type: ignore[arg-type]
        w.busy = None
        if batch is None or msg.get("ok") or failure is not None:
            return failure  # an unknown id is a reply to a batch given up on: ignore it
        with open(w.log, "a") as f:
            f.write(str(msg.get("trace", "")))
        return StageFailed(job.stage, batch, str(msg["error"]), w.log, tail(w.log))

    def close(self) -> None:
        for w in self.workers:  # all at once: an exiting worker takes seconds (ultrack, torch)
            w.hang_up()
        for w in self.workers:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(w.proc.stdout)
            w.close()
        self.workers.clear()


class _WorkerDied(Exception):
    """A worker process ended without answering (killed, out of memory, segfault)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
