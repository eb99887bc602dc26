"""A worker: run one batch through the ultrack runtime, then acknowledge it in the ledger.

The acknowledgement is the worker's last act, in a commit of its own: a batch whose worker died a
moment earlier is not complete, whatever the scheduler or the database's row counts say. The same
code runs in the driver (in-process executor), in a long-lived pool process (JSON lines on
stdin/stdout, one ultrack import per process) and as the body of a SLURM array task."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gridsearch.acks import BatchCost, acknowledge, cpu_seconds, reset_peak_rss
from gridsearch.runtime import load_config, run_batch
from gridsearch.stages import Stage

FAIL_ENV = "GRIDSEARCH_FAIL"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class BatchTask:
    """What a worker needs to run and acknowledge one batch; paths and ids only, never a secret."""

    stage: str
    config: str
    foreground: str
    contours: str
    ledger: str  # the ledger's URL (libpq finds the password in the environment)
    run_id: int
    batch: int | None  # None: the whole stage as one batch (acknowledged as batch 0)

    def argv(self) -> list[str]:
        """Command-line arguments of `python -m gridsearch.worker`, without --batch."""
        return ["--stage", self.stage, "--config", self.config, "--fg", self.foreground,
                "--ct", self.contours, "--ledger", self.ledger, "--run", str(self.run_id)]


def inject_failure(stage: str, batch: int | None, when: str) -> None:
    """Fault injection for tests and drills: GRIDSEARCH_FAIL=stage[:batch[:once-file[:when]]], or
    several such faults separated by commas.

    batch: a number, or "" / "*" for every batch. With a once-file, only the first task to create
    that file fails (a transient fault). when: "before" (the default) fails before the batch runs,
    "after" once it has written its rows but before its acknowledgement (a task killed between
    ultrack's commit and ours). E.g. link:1, segment:2::after, solve:0:/tmp/once:after."""
    for fault in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        _inject(fault.split(":"), stage, batch, when)


def _inject(parts: list[str], stage: str, batch: int | None, when: str) -> None:
    if parts[0] != stage or (parts[3] if len(parts) > 3 else "before") != when:
        return
    if len(parts) > 1 and parts[1] not in ("", "*") and batch is not None and int(parts[1]) != batch:
        return
    if len(parts) > 2 and parts[2]:
        try:
            fd = os.open(parts[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    raise RuntimeError(f"injected failure in {stage} batch {batch}" + (" after it ran" * (when == "after")))


# Start-up of this process: seconds from its start to ultrack imported (None: not ready yet), and
# whether a batch has already been charged with it (a pool worker pays it once, a SLURM task per task).
_startup_s: float | None = None
_startup_charged = False


def _process_age() -> float | None:
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # no psutil or no /proc: the start-up is then unknown, not wrong
        return None


def get_ready(*, own_process: bool) -> float | None:
    """Import ultrack once per process and remember what getting here cost.

    own_process: this process exists to run batches (pool worker, SLURM task): its start-up is the
    time since the process started, interpreter and imports included. Otherwise (the driver runs
    batches itself) only the import of ultrack, which the driver pays for its batches."""
    global _startup_s
    if _startup_s is None:
        t0 = time.perf_counter()
        import ultrack  # noqa: F401

        _startup_s = (_process_age() if own_process else None) or time.perf_counter() - t0
    return _startup_s


def _charge_startup() -> tuple[float | None, bool]:
    """(start-up, paid): the first batch after get_ready() paid it, every later one did not."""
    global _startup_charged
    paid, _startup_charged = not _startup_charged, True
    return _startup_s, paid


def batch_frames(task: BatchTask) -> int | None:
    """How many frames the batch covered (what the cost model divides by); None: unknown."""
    try:
        import zarr

        stage, cfg = Stage.parse(task.stage), load_config(task.config)
        n_frames = zarr.open(task.foreground, mode="r").shape[0]
        n = (cfg.segmentation_config if stage == Stage.SEGMENT else cfg.linking_config).n_workers
        return frames_of(stage, task.batch, n, cfg.tracking_config.window_size, n_frames)
    except Exception:  # a cost is never worth failing a batch
        return None


def frames_of(stage: Stage, batch: int | None, frames_per_batch: int, window: int | None,
              n_frames: int) -> int:
    """Frames a batch works on, as ultrack splits a stage: segment frames [b*n, (b+1)*n), link the
    source frames among the first T-1, solve window b of size W; batch None: the whole stage."""
    last = n_frames - 1 if stage == Stage.LINK else n_frames  # a link goes from t to t+1
    if batch is None:
        return last
    size = (window or n_frames) if stage == Stage.SOLVE else frames_per_batch
    return max(0, min((batch + 1) * size, last) - batch * size)


def run_and_acknowledge(task: BatchTask, ledger: sa.Engine | None = None) -> BatchCost:
    """``ledger``: an open engine on the ledger database (the driver has one), else task.ledger."""
    get_ready(own_process=False)  # no-op in a worker process: serve() and main() got ready first
    startup, paid = _charge_startup()
    frames = batch_frames(task)
    reset_peak_rss()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    inject_failure(task.stage, task.batch, "before")
    run_batch(Stage.parse(task.stage), task.config, task.batch, task.run_id, task.foreground, task.contours)
    inject_failure(task.stage, task.batch, "after")
    cost = BatchCost.since(t0, cpu0, frames=frames, startup_s=startup, paid_startup=paid)
    acknowledge(ledger if ledger is not None else task.ledger, task.run_id, task.batch or 0, cost)
    return cost


def die_with_parent(parent: int | None) -> None:
    """A pool worker must not outlive its driver: after a driver's kill -9, a worker that wrote on
    would insert rows while the next driver clears the database. Linux's parent-death signal
    kills it with its parent. ``parent``: the driver's pid, as the driver said: one that died while
    this process was still starting (before the signal was set) left it to another parent; exit."""
    expected = parent if parent is not None else os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the driver's close() still applies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected:
        os._exit(1)


def serve(parent: int | None = None) -> int:
    """JSON-lines loop on stdin/stdout: one task in, one result out. Logs go to stderr."""
    die_with_parent(parent)
    # ultrack, tqdm and the CBC solver (C code) print to fd 1: the protocol gets its own fd and
    # fd 1 becomes a copy of stderr (the worker's log).
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    get_ready(own_process=True)  # pay the import once, before the first task

    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        reply: dict[str, Any] = {"id": msg["id"]}
        try:
            cost = run_and_acknowledge(BatchTask(**msg["task"]))
            reply.update(ok=True, cost=asdict(cost))
        except BaseException as e:  # report every failure; the driver decides
            reply.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0],
                         trace=traceback.format_exc())
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridsearch.worker")
    ap.add_argument("--serve", action="store_true", help="long-lived JSON-lines worker")
    ap.add_argument("--parent", type=int, help="with --serve: the driver's pid (the worker dies with it)")
    ap.add_argument("--stage")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--fg")
    ap.add_argument("--ct")
    ap.add_argument("--ledger")
    ap.add_argument("--run", type=int)
    ap.add_argument("--count", type=int, default=1, help="run this many batches in turn from --batch on")
    ap.add_argument("--last", type=int, help="with --count: no batch after this one")
    a = ap.parse_args(argv)
    if a.serve:
        return serve(a.parent)
    first = a.batch if a.batch is not None else int(os.environ["SLURM_ARRAY_TASK_ID"])
    last = first + max(1, a.count) - 1
    if a.last is not None:
        last = min(last, a.last)
    get_ready(own_process=True)
    for batch in range(first, last + 1):  # a failure stops the task: the rest stay unacknowledged
        run_and_acknowledge(BatchTask(a.stage, str(a.config), a.fg, a.ct, a.ledger, a.run, batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
