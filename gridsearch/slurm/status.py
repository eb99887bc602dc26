"""Task states of a sweep's jobs: one squeue call (plus one sacct call when accounting exists) per
poll cycle for all of them, selected by the sweep's job names, never one call per job.

squeue covers live jobs and, while MinJobAge lasts, finished ones; sacct (slurmdbd only) remembers
longer. Rules from what this cluster prints: an explicit task row beats a range row; sacct speaks
for an array only when it lists every task index (right after submission it can show an array as
one COMPLETED plain job); only the first word of State counts ('CANCELLED by 0')."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gridsearch.slurm.submit import expand

LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
OK = "COMPLETED"
DEPENDENCY = "DependencyNeverSatisfied"

SQUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%j"


@dataclass(frozen=True)
class TaskState:
    state: str  # SLURM's state word; UNKNOWN when neither squeue nor sacct knows the task
    reason: str = ""
    explicit: bool = True  # a row of its own (False: covered by a pending range row)

    @property
    def live(self) -> bool:
        return self.state in LIVE and not self.dependency_failed

    @property
    def ok(self) -> bool:
        return self.state == OK

    @property
    def dependency_failed(self) -> bool:
        """Cancelled (kill_invalid_depend) or stuck pending because a job it waits for failed."""
        return self.reason == DEPENDENCY

    @property
    def failed(self) -> bool:
        return not self.live and not self.ok


Key = tuple[str, int | None]  # (array job id, task index) or (job id, None) for a plain job


def _rows(text: str, fields: int) -> Iterable[list[str]]:
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= fields:
            yield parts


def _task_key(jobid: str) -> tuple[str, list[int] | None, bool]:
    """'239_[2-9%2]' -> ('239', [2..9], range); '239_0' -> ('239', [0], explicit); '237' -> plain."""
    if "_" not in jobid:
        return jobid, None, True
    base, idx = jobid.split("_", 1)
    if idx.startswith("["):
        return base, expand(idx), False
    return base, [int(idx)], True


def _put(out: dict[Key, TaskState], key: Key, st: TaskState) -> None:
    old = out.get(key)
    if old is None or (st.explicit and not old.explicit):
        out[key] = st


def parse_squeue(text: str) -> dict[Key, TaskState]:
    """Lines of `squeue -h -t all -o '%i|%A|%F|%K|%T|%r|%j'`."""
    out: dict[Key, TaskState] = {}
    for jobid, _raw, _array, _idx, state, reason, _name in _rows(text, 7):
        base, idx, explicit = _task_key(jobid)
        st = state.split()[0] if state.strip() else "UNKNOWN"
        reason = reason.strip()
        if idx is None:
            _put(out, (base, None), TaskState(st, reason, True))
        else:
            for i in idx:
                _put(out, (base, i), TaskState(st, reason, explicit))
    return out


def parse_sacct(text: str) -> dict[Key, TaskState]:
    """Lines of `sacct -X -n -P -j ids -o JobID,JobIDRaw,State,ExitCode` (no reasons there)."""
    out: dict[Key, TaskState] = {}
    for jobid, _raw, state, _exit in _rows(text, 4):
        base, idx, explicit = _task_key(jobid)
        st = state.split()[0] if state.strip() else "UNKNOWN"
        if idx is None:
            _put(out, (base, None), TaskState(st, "", True))
        else:
            for i in idx:
                _put(out, (base, i), TaskState(st, "", explicit))
    return out


def merge(
    squeue: dict[Key, TaskState], sacct: dict[Key, TaskState], arrays: dict[str, Sequence[int]]
) -> dict[Key, TaskState]:
    """Per task of every array in `arrays` (job id -> its task indices): one state.

    squeue wins for what it shows; sacct fills in only for arrays it lists completely; a task
    missing from an array that squeue still shows was cancelled alone (it leaves the range)."""
    out: dict[Key, TaskState] = {}
    for job, indices in arrays.items():
        sq_known = any(k[0] == job for k in squeue)
        sa_complete = bool(indices) and all((job, i) in sacct for i in indices)
        whole_sa = sacct.get((job, None))  # a pending array cancelled as a whole is one record
        if whole_sa is not None and (whole_sa.ok or whole_sa.state in LIVE):
            whole_sa = None  # right after submission sacct may show an array as one COMPLETED job
        for i in indices:
            sq = squeue.get((job, i)) or squeue.get((job, None))
            sa = sacct.get((job, i)) if sa_complete else whole_sa
            if sq is not None and (sq.explicit or sa is None or not sa.explicit):
                out[(job, i)] = sq
            elif sa is not None:
                out[(job, i)] = sa
            elif sq_known:
                out[(job, i)] = TaskState("CANCELLED", "vanished", True)
            else:
                out[(job, i)] = TaskState("UNKNOWN", "", True)
    return out


class Poller:
    """One squeue (+ one sacct) per poll for a set of job names; sleeps adaptively between polls:
    short right after a change, growing to `max_s` while nothing moves."""

    def __init__(self, names: Sequence[str], max_s: float = 2.0, min_s: float = 0.25) -> None:
        self.names = list(names)
        self.max_s, self.min_s = max(max_s, min_s), min_s
        self.interval = min_s
        self.accounting: bool | None = None  # decided at the first sacct attempt
        self.calls = 0
        self.last: dict[Key, TaskState] = {}

    def squeue(self) -> dict[Key, TaskState]:
        self.calls += 1
        r = subprocess.run(["squeue", "-h", "-t", "all", "-n", ",".join(self.names), "-o", SQUEUE_FORMAT],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
        return parse_squeue(r.stdout)

    def sacct(self, job_ids: Sequence[str]) -> dict[Key, TaskState]:
        if self.accounting is False or not job_ids:
            return {}
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o",
                            "JobID,JobIDRaw,State,ExitCode"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            if self.accounting is None or "accounting storage is disabled" in (r.stderr + r.stdout):
                self.accounting = False
            return {}
        self.accounting = True
        return parse_sacct(r.stdout)

    def poll(self, arrays: dict[str, Sequence[int]]) -> dict[Key, TaskState]:
        """States of every task of `arrays`; also adapts the next sleep."""
        sq = self.squeue()
        sa = self.sacct(sorted(arrays)) if arrays else {}
        states = merge(sq, sa, arrays)
        if states != self.last:
            self.interval = self.min_s
        else:
            self.interval = min(self.max_s, self.interval * 1.5)
        self.last = states
        return states

    def sleep(self) -> None:
        time.sleep(self.interval)
