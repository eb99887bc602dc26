"""Run batches on this machine: in-process when one writer at a time (SQLite), else a worker pool.

ultrack's import costs ~4-5 s (torch), more than a stage on a small movie: neither path pays it per
batch. In-process, the driver imports it once; the pool's workers import it once each."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from gridsearch.executors.base import Events, Executor, StageFailed, StageJob
from gridsearch.worker import fd_redirect, run_batch


def tail(path: Path, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class InProcessExecutor(Executor):
    """Whole stages in the driver, one after another: SQLite takes one writer at a time anyway.

    Each stage is one call with batch_index=None (ultrack then walks every frame, and solve windows
    even-then-odd, itself): with n_workers=1 no process pool is spawned, and the per-call set-up
    that per-frame batches would repeat is paid once (measured in tests/benchmarks)."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "ultrack.log"

    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        for job in jobs:
            events.stage_started(job.stage, 1)
            try:
                with fd_redirect(self.log):
                    run_batch(job.stage, job.config_path, None, job.foreground, job.contours)
            except Exception as e:
                with open(self.log, "a") as f:
                    f.write(traceback.format_exc())
                raise StageFailed(job.stage, None, _one_line(e), self.log, tail(self.log)) from e
            events.batch_done(job.stage, 0)
            events.stage_done(job.stage)


class _Worker:
    def __init__(self, idx: int, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._logf: IO[bytes] = open(log, "ab")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridsearch.worker", "--serve"],
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

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


class PoolExecutor(Executor):
    """N long-lived worker processes, each what a SLURM array task is: a separate database client.

    The password reaches them only through the environment (PGPASSWORD), never argv."""

    def __init__(self, workers: int, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.n = workers
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}
        self.workers: list[_Worker] = []
        self.sel = selectors.DefaultSelector()
        self._next_id = 0

    def _start(self) -> None:
        """Top the pool up to N (a worker that died is replaced at the next stage)."""
        for i in range(len(self.workers), self.n):
            w = _Worker(i, self.env, self.log_dir / f"worker-{i}.log")
            assert w.proc.stdout is not None
            self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            self.workers.append(w)

    def _read(self, w: _Worker) -> dict[str, object]:
        assert w.proc.stdout is not None
        line = w.proc.stdout.readline()
        if not line:
            code = w.proc.wait()
            raise _WorkerDied(w, f"worker process exited with code {code}")
        return json.loads(line)

    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        self._start()
        for job in jobs:
            events.stage_started(job.stage, job.n_batches)
            for phase in job.phases:
                self._run_phase(job, phase, events)
            events.stage_done(job.stage)

    def _run_phase(self, job: StageJob, phase: list[int], events: Events) -> None:
        queue = list(phase)
        running: dict[int, int] = {}  # task id -> batch
        failure: StageFailed | None = None
        while queue or running:
            for w in self.workers:
                if w.ready and w.busy is None and queue and failure is None:
                    b = queue.pop(0)
                    self._next_id += 1
                    w.busy = self._next_id
                    running[self._next_id] = b
                    w.send({"id": self._next_id, "stage": job.stage.label, "config": str(job.config_path),
                            "batch": b, "fg": job.foreground, "ct": job.contours})
            if failure is not None and not running:
                break
            for key, _ in self.sel.select(timeout=1.0):
                w: _Worker = key.data
                try:
                    msg = self._read(w)
                except _WorkerDied as e:
                    self.sel.unregister(key.fileobj)
                    batch = running.pop(w.busy, None) if w.busy is not None else None
                    self.workers.remove(w)
                    raise StageFailed(job.stage, batch, e.reason, w.log, tail(w.log)) from None
                if "ready" in msg:
                    w.ready = True
                    continue
                b = running.pop(int(msg["id"]))  # type: ignore[arg-type]
                w.busy = None
                if msg.get("ok"):
                    events.batch_done(job.stage, b)
                elif failure is None:
                    with open(w.log, "a") as f:
                        f.write(str(msg.get("trace", "")))
                    failure = StageFailed(job.stage, b, str(msg["error"]), w.log, tail(w.log))
        if failure is not None:
            raise failure

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers.clear()
        self.sel.close()


class _WorkerDied(Exception):
    """A worker process ended without answering (killed, out of memory, segfault)."""

    def __init__(self, w: _Worker, reason: str) -> None:
        self.w, self.reason = w, reason


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
