"""The only module that runs SLURM's commands (sbatch, squeue, sacct, scancel, scontrol).

One option builder serves the stage arrays and the single server job, so partition, account,
resources and the user's sbatch_args reach every job the same way. The worker command line holds
paths only: the database password reaches the tasks through the environment sbatch exports."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import tenacity

from gridsearch.core.errors import GridsearchError, Unavailable, first_line, ignore
from gridsearch.core.files import atomic_write
from gridsearch.core.secrets import without_secrets
from gridsearch.core.waiting import wait_until
from gridsearch.slurm.parse import (
    LIVE_STATES,
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    UNKNOWN,
    Key,
    QueuedJob,
    TaskState,
    compact,
    duration_s,
    merge,
    parse_queue,
    parse_sacct,
    parse_squeue,
)
from gridsearch.slurm.paths import JobPaths
from gridsearch.spec import ExecutorSpec, StageResources

T = TypeVar("T")
PATIENCE_S = 900.0  # how long a scheduler outage is waited out before the sweep stops

DEFAULT_RESOURCES: dict[str, StageResources] = {
    "segment": StageResources(cpus=1, mem="8G", time="01:00:00"),
    "link": StageResources(cpus=1, mem="8G", time="01:00:00"),
    "solve": StageResources(cpus=1, mem="8G", time="04:00:00"),
    "server": StageResources(cpus=2, mem="4G", time="7-00:00:00"),
    # the driver job (`sweep --submit`): a day at a time, it resubmits itself before its limit
    "driver": StageResources(cpus=1, mem="4G", time="1-00:00:00"),
}


class SlurmError(RuntimeError):
    """A SLURM command failed; the message is its first line of output."""


class SbatchError(SlurmError, GridsearchError):
    """sbatch refused a submission (a partition, account or limit): every trial would meet the same
    refusal, so the sweep stops with it, resumable once the sweep file or the cluster is fixed."""


@dataclass
class ArrayRequest:
    """One sbatch call: a stage's batch indices (already below MaxArraySize after `offset`)."""

    name: str
    stage: str
    indices: list[int]  # array indices; the batch is index + offset
    offset: int
    worker_args: list[str]  # after `python -m gridsearch.worker`, without --batch
    log_dir: Path
    script_dir: Path | None = None  # None: log_dir/scripts
    after: list[str] = field(default_factory=list)  # job ids (afterok)
    per_task: int = 1  # batches a task runs in turn: index*per_task + offset and on
    last: int | None = None  # with per_task > 1: the last batch any task may run

    @property
    def paths(self) -> JobPaths:
        return JobPaths(self.log_dir, self.script_dir)


def _run(argv: Sequence[str], timeout: float = 60, stdin: str | None = None,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer in {timeout:.0f} s") from None
    except OSError as e:
        raise SlurmError(f"{argv[0]}: {e.strerror or e}") from None


# ---- sbatch ---------------------------------------------------------------------------------
def sbatch_options(name: str, what: str, spec: ExecutorSpec, output: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    """The sbatch command line of any gridsearch job; `what` picks the resources (a stage label or
    'server'); the user's sbatch_args come last so that they win."""
    res = spec.stages.get(what) or DEFAULT_RESOURCES[what]  # type: ignore[call-overload]
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}",
            f"--cpus-per-task={res.cpus}", f"--mem={res.mem}", f"--time={res.time}",
            f"--chdir={os.getcwd()}", "--export=ALL", *extra]
    if spec.partition:
        argv.append(f"--partition={spec.partition}")
    if spec.account:
        argv.append(f"--account={spec.account}")
    return argv + list(spec.sbatch_args)


def sbatch_argv(req: ArrayRequest, spec: ExecutorSpec) -> list[str]:
    extra = [f"--array={compact(req.indices)}%{spec.max_parallel}"]
    if req.after:
        extra += [f"--dependency=afterok:{':'.join(req.after)}", "--kill-on-invalid-dep=yes"]
    return sbatch_options(req.name, req.stage, spec, req.paths.array_output(req.stage), extra)


def script(req: ArrayRequest, setup: Sequence[str]) -> str:
    """The task body: setup lines, then one worker call from batch SLURM_ARRAY_TASK_ID * per_task +
    offset on, running per_task batches in turn (one ultrack import for all of them)."""
    task = "SLURM_ARRAY_TASK_ID" + (f" * {req.per_task}" if req.per_task > 1 else "")
    batch = f"$(({task} + {req.offset}))"
    worker = shlex.join([sys.executable, "-m", "gridsearch.worker", *req.worker_args])
    more = f" --count {req.per_task} --last {req.last}" if req.per_task > 1 and req.last is not None else ""
    return "\n".join(["#!/bin/bash", "set -e", *setup,
                      f'echo "gridsearch {req.stage} batch {batch}{more} on $(hostname)"',
                      f"exec {worker} --batch {batch}{more}", ""])


def job_script(command: Sequence[str], setup: Sequence[str]) -> str:
    return "\n".join(["#!/bin/bash", "set -e", *setup, "exec " + shlex.join(command), ""])


# sbatch's words for "slurmctld did not answer in time": the job may exist all the same
_TRANSIENT = re.compile(r"timed out|did not answer|unable to contact|temporarily|try again|"
                        r"zero bytes were transmitted|connection refused", re.IGNORECASE)
_RECONCILE_S = 20.0  # how long a job sbatch was unsure about may take to show in squeue


class _NotSubmitted(SlurmError):
    """sbatch failed transiently and no job carries its tag: submitting again is safe."""


def _sbatch(argv: list[str], body: str, name: str, env: Mapping[str, str],
            notify: Callable[[str], None] = ignore) -> str:
    """Submit, tagged so that the job can be found by name when sbatch cannot say: an sbatch that
    timed out may have queued the job all the same (slurmctld answers late), and submitting
    again would leave an unknown array writing to the database. A transient failure is
    reconciled by the tag, then retried like any scheduler outage; a refusal is final.

    The job's environment (--export=ALL: slurmctld saves it) is ours minus every secret, plus
    ``env`` (PGPASSFILE: libpq's password file on the shared filesystem)."""
    tags: list[str] = []

    def attempt() -> str:
        tags.append(f"gridsearch:{uuid.uuid4().hex[:16]}")
        r = None
        try:
            r = _run([argv[0], f"--comment={tags[-1]}", *argv[1:]], timeout=120, stdin=body,
                     env={**without_secrets(), **env})
            failure = "" if r.returncode == 0 else first_line(r.stderr or r.stdout)
        except SlurmError as e:
            failure = str(e)
        if r is not None and not failure:
            return r.stdout.strip().split(";")[0]
        if not _TRANSIENT.search(failure):
            raise SbatchError(f"sbatch for {name} failed: {failure}")
        found = _tagged(name, tags, notify)
        if found is None:
            raise _NotSubmitted(f"sbatch for {name}: {failure}")
        notify(f"sbatch for {name} reported '{failure}' but job {found} was queued: adopted")
        return found

    return patiently(attempt, PATIENCE_S, notify, f"sbatch for {name}")


def _tagged(name: str, tags: Sequence[str], notify: Callable[[str], None]) -> str | None:
    """The job carrying one of `tags` (a job sbatch was unsure about), looked for a little while:
    slurmctld may still be processing the request that timed out."""

    def lookup() -> str | None:
        r = _run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%F|%k"])
        if r.returncode != 0:
            raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
        ids = [job for job, _, tag in (ln.strip().partition("|") for ln in r.stdout.splitlines())
               if tag in tags]
        return ids[0] if ids else None

    return wait_until(lambda: patiently(lookup, PATIENCE_S, notify, f"squeue for {name}"), _RECONCILE_S, 2.0)


def submit_array(req: ArrayRequest, spec: ExecutorSpec, env: Mapping[str, str] | None = None,
                 notify: Callable[[str], None] = ignore) -> str:
    """Submit one stage array; returns its job id. The script is kept next to the logs."""
    paths = req.paths
    paths.logs.mkdir(parents=True, exist_ok=True)
    body = script(req, spec.setup)
    job_id = _sbatch(sbatch_argv(req, spec), body, req.name, env or {}, notify)
    atomic_write(paths.script(req.stage, job_id), body)
    return job_id


def submit_job(spec: ExecutorSpec, what: str, name: str, command: Sequence[str], paths: JobPaths,
               env: Mapping[str, str] | None = None, notify: Callable[[str], None] = ignore,
               extra: Sequence[str] = ()) -> str:
    """Submit a single job running `command` (what='server': the PostgreSQL server; 'driver')."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    body = job_script(command, spec.setup)
    job_id = _sbatch(sbatch_options(name, what, spec, paths.job_output(what), extra), body, name,
                     env or {}, notify)
    atomic_write(paths.script(what, job_id), body)
    return job_id


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """Array indices must be below MaxArraySize (`scontrol show config`; SLURM's default 1001)."""
    try:
        text = _run(["scontrol", "show", "config"], timeout=30).stdout
    except SlurmError:
        return 1001
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 1001


# ---- scancel and single-job queries ----------------------------------------------------------
def cluster_cpus(partition: str | None = None) -> int | None:
    """CPUs of the partition's nodes (each node once: sinfo lists a node per partition); None when
    sinfo cannot say. An upper bound on tasks at once, whatever max_parallel allows."""
    try:
        r = _run(["sinfo", "-h", "-N", "-o", "%N|%c", *(["-p", partition] if partition else [])], timeout=30)
    except SlurmError:
        return None
    nodes = dict(line.strip().split("|", 1) for line in r.stdout.splitlines() if "|" in line)
    total = sum(int(c) for c in nodes.values() if c.strip().isdigit())
    return total if r.returncode == 0 and total > 0 else None


def task_slots(spec: ExecutorSpec, stage: str, cpus: int | None) -> int:
    """Tasks of `stage` that may run at once: max_parallel, no more than the partition's CPUs
    (`cluster_cpus`; None: unknown) hold tasks of the stage's `cpus`. The executor sizes tasks
    by it and `plan` counts them by it."""
    res = spec.stages.get(stage) or DEFAULT_RESOURCES[stage]  # type: ignore[call-overload]
    if cpus is None:
        return spec.max_parallel
    return min(spec.max_parallel, max(1, cpus // max(1, res.cpus)))


def scancel_ids(ids: Sequence[str]) -> None:
    if ids:
        _run(["scancel", *ids])


def scancel_names(names: Sequence[str]) -> None:
    _run(["scancel", "-n", ",".join(names)])


def live_jobs(names: Sequence[str]) -> list[str]:
    """Job ids (array ids once) of the named jobs still queued or running."""
    r = _run(["squeue", "-h", "-n", ",".join(names), "-o", "%F|%T"])
    if r.returncode != 0:
        raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
    return sorted({job for job, _, state in (ln.strip().partition("|") for ln in r.stdout.splitlines())
                   if job and state in LIVE_STATES})


def job_state_reason(job_id: str) -> tuple[str, str]:
    """(state, reason) of one job; (UNKNOWN, "") once squeue no longer knows it."""
    r = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"])
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
    state, _, reason = (r.stdout.strip().splitlines() or [UNKNOWN])[0].partition("|")
    return state, reason


def time_left(job_id: str) -> float | None:
    """Seconds before the job's time limit (None: no limit, or squeue does not know the job)."""
    r = _run(["squeue", "-h", "-j", job_id, "-o", "%L"])
    if r.returncode != 0:
        raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
    return duration_s((r.stdout.strip().splitlines() or [""])[0])


def queued(names: Sequence[str], timeout: float = 30) -> list[QueuedJob]:
    """What `status` shows of the named jobs: their live tasks, from one squeue call. `-t all`
    rather than a list of live states, which an older squeue may refuse a word of; the parser
    keeps the live ones. A scheduler that does not answer is not waited out (a view says so)."""
    r = _run(["squeue", "-h", "-t", "all", "-n", ",".join(names), "-o", SQUEUE_FORMAT], timeout=timeout)
    if r.returncode != 0:
        raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
    return parse_queue(r.stdout)


def queue_position(job_id: str) -> int | None:
    """1 + how many pending jobs the scheduler ranks before this one (None: not pending)."""
    r = _run(["squeue", "-h", "-t", "PENDING", "--sort=-p,i", "-o", "%i"])
    ids = [line.strip() for line in r.stdout.splitlines()]
    return ids.index(job_id) + 1 if job_id in ids else None


def patiently(call: Callable[[], T], patience: float, notify: Callable[[str], None], what: str) -> T:
    """Call until it stops raising SlurmError: a scheduler that times out or restarts is waited
    out (backing off to 30 s, saying so), for `patience` seconds; then the sweep stops,
    resumable. An outage is never a trial's failure."""

    def tell(state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and state.attempt_number in (1, 5, 20, 50):
            notify(f"{what}: {state.outcome.exception()}; waiting for the scheduler "
                   f"({state.seconds_since_start:.0f} s of {patience:.0f} s)")

    try:
        return tenacity.Retrying(retry=tenacity.retry_if_exception(_outage),
                                 stop=tenacity.stop_after_delay(patience),
                                 wait=tenacity.wait_exponential(multiplier=1, max=30),
                                 before_sleep=tell, reraise=True)(call)
    except SlurmError as e:
        raise Unavailable(f"{what}: the scheduler did not answer for {patience:.0f} s ({e}); the sweep "
                          "stopped and its jobs stay queued: run the same command again to resume") from None


def _outage(e: BaseException) -> bool:
    """A scheduler that did not answer, not one that said no."""
    return isinstance(e, SlurmError) and not isinstance(e, SbatchError)


def job_state(job_id: str) -> str:
    """SLURM's state word for one job; UNKNOWN once squeue no longer knows it. A squeue that
    fails raises SlurmError: read as UNKNOWN it would say a running server job had ended."""
    return job_state_reason(job_id)[0]


def wait_gone(job_id: str, timeout: float = 60) -> bool:
    """Until the job has left the live states (e.g. the server stopped cleanly after scancel); a
    squeue that fails meanwhile tells nothing, so the wait goes on."""

    def gone() -> bool:
        try:
            return job_state(job_id) not in LIVE_STATES
        except SlurmError:
            return False

    return bool(wait_until(gone, timeout, 0.3))


def wait_all_gone(job_ids: Sequence[str], timeout: float = 300) -> bool:
    """Until none of the jobs (arrays included) is queued or running any more: scancel returns
    before its signals have landed, and a task still writing must not meet a clear."""
    if not job_ids:
        return True

    def gone() -> bool:
        r = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%T"])
        if r.returncode != 0:  # every id forgotten already, or the scheduler did not answer
            return "Invalid job id" in r.stderr
        return not any(state in LIVE_STATES for state in r.stdout.split())

    return bool(wait_until(gone, timeout, 0.5))


# ---- polling the tasks of many arrays --------------------------------------------------------
class Poller:
    """One squeue (+ one sacct) per poll for a set of job names; sleeps adaptively between polls:
    short right after a change, growing to `max_s` while nothing moves."""

    def __init__(self, names: Sequence[str], max_s: float = 2.0, min_s: float = 0.25,
                 notify: Callable[[str], None] = ignore) -> None:
        self.names = list(names)
        self.notify = notify
        self.max_s, self.min_s = max(max_s, min_s), min_s
        self.interval = min_s
        self.accounting: bool | None = None  # decided at the first sacct attempt
        self.calls = 0
        self.last: dict[Key, TaskState] = {}

    def squeue(self) -> dict[Key, TaskState]:
        """Waited out (see `patiently`): a busy slurmctld times out now and then."""
        return patiently(self._squeue, PATIENCE_S, self.notify, "squeue")

    def _squeue(self) -> dict[Key, TaskState]:
        self.calls += 1
        r = _run(["squeue", "-h", "-t", "all", "-n", ",".join(self.names), "-o", SQUEUE_FORMAT])
        if r.returncode != 0:
            raise SlurmError(f"squeue failed: {first_line(r.stderr or r.stdout)}")
        return parse_squeue(r.stdout)

    def sacct(self, job_ids: Sequence[str]) -> dict[Key, TaskState]:
        if self.accounting is False or not job_ids:
            return {}
        r = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", SACCT_FIELDS])
        if r.returncode != 0:
            if self.accounting is None or "accounting storage is disabled" in (r.stderr + r.stdout):
                self.accounting = False
            return {}
        self.accounting = True
        return parse_sacct(r.stdout)

    def poll(self, arrays: dict[str, list[int]]) -> dict[Key, TaskState]:
        """States of every task of `arrays` (job id -> task indices); also adapts the next sleep."""
        if not arrays:
            return {}
        states = merge(self.squeue(), self.sacct(sorted(arrays)), arrays)
        self.interval = self.min_s if states != self.last else min(self.max_s, self.interval * 1.5)
        self.last = states
        return states

    def sleep(self) -> None:
        time.sleep(self.interval)
