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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from gridsearch.core.files import tail
from gridsearch.executors.base import (
    ConcurrentExecutor,
    Events,
    ExecutorContext,
    Handle,
    StageFailed,
    StageJob,
)


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


@dataclass(eq=False)
class _Flow:
    """One unit's progress through its jobs' phases on the pool."""

    handle: Handle
    whole: bool  # one task per stage (batch None): the database takes one writer (SQLite)
    j: int = -1  # current job
    p: int = 0  # current phase of that job
    queue: list[int | None] = field(default_factory=list)
    running: set[int] = field(default_factory=set)  # message ids
    failure: StageFailed | None = None
    reported: set[tuple[int, int]] = field(default_factory=set)

    @property
    def job(self) -> StageJob:
        return self.handle.jobs[self.j]

    def phase(self) -> list[int]:
        return [0] if self.whole else self.job.phases[self.p]

    def advance(self) -> bool:
        """Next phase (or job); False once every job is done."""
        if self.j >= 0 and self.p + 1 < (1 if self.whole else len(self.job.phases)):
            self.p += 1
        else:
            if self.j >= 0:
                self.handle.events.stage_done(self.job.stage)
            self.j, self.p = self.j + 1, 0
            if self.j >= len(self.handle.jobs):
                return False
            self.handle.events.stage_started(self.job.stage, 1 if self.whole else self.job.n_batches)
        self.queue = [None] if self.whole else list(self.phase())
        return True


class PoolExecutor(ConcurrentExecutor):
    """Units share the pool: each dispatches its current phase's batches to free workers, in the
    order the units were started (the engine starts the heaviest branch first)."""

    def __init__(self, ctx: ExecutorContext, workers: int | None = None, whole_stages: bool = False) -> None:
        super().__init__(ctx)
        self.n = workers or ctx.sweep.executor.workers
        self.whole = whole_stages
        self.log_dir = ctx.ws.logs
        self.env = {**os.environ, **ctx.backend.env}
        self.workers: list[_Worker] = []
        self.sel = selectors.DefaultSelector()
        self._next_id = 0
        self.flows: list[_Flow] = []
        self.sent: dict[int, tuple[_Flow, int | None]] = {}  # message id -> (flow, batch)

    def _start(self) -> None:
        """Top the pool up to N (after a worker died, the whole pool was stopped)."""
        for i in range(len(self.workers), self.n):
            w = _Worker(i, self.env, self.log_dir / f"worker-{i}.log")
            assert w.proc.stdout is not None
            self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            self.workers.append(w)

    def start(self, jobs: Sequence[StageJob], events: Events) -> Handle:
        flow = _Flow(Handle(list(jobs), events), self.whole)
        if flow.advance():
            self.flows.append(flow)
        else:
            flow.handle.end()
        return flow.handle

    def poll(self) -> list[Handle]:
        self._start()
        self._dispatch()
        for key, _ in self.sel.select(timeout=1.0 if self.sent or not self._all_ready() else 0.05):
            self._receive(key.data)
        ended = [f for f in self.flows if self._step(f)]
        self.flows = [f for f in self.flows if f not in ended]
        self._dispatch()
        return [f.handle for f in ended]

    def _all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    def _dispatch(self) -> None:
        for w in self.workers:
            if not (w.ready and w.busy is None):
                continue
            flow = next((f for f in self.flows if f.queue and f.failure is None), None)
            if flow is None:
                return
            batch = flow.queue.pop(0)
            self._next_id += 1
            w.busy = self._next_id
            self.sent[self._next_id] = (flow, batch)
            flow.running.add(self._next_id)
            w.send({"id": self._next_id, "task": asdict(self.task(flow.job, batch))})

    def _step(self, flow: _Flow) -> bool:
        """Report acknowledgements; at the end of a phase check them and move on. True: ended."""
        job = flow.job
        acked = self.report_acknowledged([job], flow.reported, flow.handle.events)[job.run_id]
        if (flow.queue and flow.failure is None) or flow.running:
            return False
        if flow.failure is None:
            missing = set(flow.phase()) - acked
            if missing:
                flow.failure = StageFailed(job.stage, None if flow.whole else min(missing),
                                           "the worker replied without acknowledging")
        if flow.failure is not None:
            flow.handle.end(flow.failure)
            return True
        if flow.advance():
            return False
        flow.handle.end()
        return True

    def _receive(self, w: _Worker) -> None:
        """A reply. On the first failure a unit stops dispatching and lets its running batches
        finish (their acknowledgements are kept), then ends with the failure."""
        try:
            msg = w.read()
        except _WorkerDied as e:
            self._worker_died(w, e)
            return
        if "ready" in msg:
            w.ready = True
            return
        sent = self.sent.pop(int(msg["id"]), None)  # type: ignore[arg-type]
        w.busy = None
        if sent is None:
            return  # an unknown id is a reply to a batch given up on: ignore it
        flow, batch = sent
        flow.running.discard(int(msg["id"]))  # type: ignore[arg-type]
        if msg.get("ok") or flow.failure is not None:
            return
        with open(w.log, "a") as f:
            f.write(str(msg.get("trace", "")))
        flow.failure = StageFailed(flow.job.stage, batch, str(msg["error"]), w.log, tail(w.log))

    def _worker_died(self, w: _Worker, e: _WorkerDied) -> None:
        """The survivors may be writing: stop them all before anything clears a database. The
        dead worker's unit fails; the others' interrupted batches go back to their queues (each
        batch clears its own partial rows before it runs)."""
        lost = self.sent.pop(w.busy, None) if w.busy is not None else None
        self.close()
        for flow, batch in self.sent.values():
            flow.queue.insert(0, batch)
        for flow in self.flows:
            flow.running.clear()
        self.sent.clear()
        if lost is not None:
            flow, batch = lost
            flow.failure = StageFailed(flow.job.stage, batch, e.reason, w.log, tail(w.log))
        elif self.flows:
            first = self.flows[0]
            first.failure = first.failure or StageFailed(first.job.stage, None, e.reason, w.log, tail(w.log))

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
