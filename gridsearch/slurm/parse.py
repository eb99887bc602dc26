"""What SLURM prints, read without running it: array syntax, squeue and sacct lines, one state per task.

squeue covers live jobs and, while MinJobAge lasts, finished ones; sacct (slurmdbd only) remembers
longer. Rules from what this cluster prints: an explicit task row beats a range row; sacct speaks
for an array only when it lists every task index (right after submission it can show an array as
one COMPLETED plain job); only the first word of State counts ('CANCELLED by 0')."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The one set of states in which a job or task may still run (or is about to): every wait uses it.
LIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD",
})
OK = "COMPLETED"
UNKNOWN = "UNKNOWN"  # neither squeue nor sacct knows the task (MinJobAge passed, no accounting)
DEPENDENCY = "DependencyNeverSatisfied"

SQUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%j"
SACCT_FIELDS = "JobID,JobIDRaw,State,ExitCode,Reason"

Key = tuple[str, int | None]  # (array job id, task index) or (job id, None) for a plain job


@dataclass(frozen=True)
class TaskState:
    state: str  # SLURM's state word; UNKNOWN when neither squeue nor sacct knows the task
    reason: str = ""
    explicit: bool = True  # a row of its own (False: covered by a pending range row)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES and not self.dependency_failed

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

    @property
    def terminal(self) -> bool:
        """SLURM's final word on the task: it never changes afterwards (UNKNOWN is no word)."""
        return self.state not in LIVE_STATES and self.state != UNKNOWN


def compact(indices: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8' (SLURM's --array syntax)."""
    out: list[str] = []
    idx = sorted(set(indices))
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out)


def expand(ranges: str) -> list[int]:
    """'0-2,5' -> [0,1,2,5]; a throttle suffix ('%4') and step (':2') are understood."""
    ranges = ranges.split("%")[0].strip("[]")
    out: list[int] = []
    for part in filter(None, ranges.split(",")):
        step = 1
        if ":" in part:
            part, s = part.split(":")
            step = int(s)
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1, step))
        else:
            out.append(int(part))
    return out


def split(indices: Sequence[int], limit: int) -> list[tuple[int, list[int]]]:
    """Batch indices -> [(offset, array indices)], every array index < limit; batch = index + offset."""
    chunks: dict[int, list[int]] = {}
    for b in sorted(set(indices)):
        off = (b // limit) * limit
        chunks.setdefault(off, []).append(b - off)
    return sorted(chunks.items())


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


def _add(out: dict[Key, TaskState], jobid: str, state: str, reason: str) -> None:
    base, idx, explicit = _task_key(jobid)
    word = state.split()[0] if state.strip() else UNKNOWN
    if idx is None:
        _put(out, (base, None), TaskState(word, reason.strip(), True))
    else:
        for i in idx:
            _put(out, (base, i), TaskState(word, reason.strip(), explicit))


def parse_squeue(text: str) -> dict[Key, TaskState]:
    """Lines of `squeue -h -t all -o '%i|%A|%F|%K|%T|%r|%j'`."""
    out: dict[Key, TaskState] = {}
    for jobid, _raw, _array, _idx, state, reason, _name in _rows(text, 7):
        _add(out, jobid, state, reason)
    return out


@dataclass(frozen=True)
class QueuedJob:
    """One job of a sweep as `status` shows it: a single job (the server) or an array, its live
    tasks counted by state, with the reasons SLURM gives for the pending ones."""

    job_id: str  # the array's job id, or the job's
    name: str
    array: bool
    states: dict[str, int] = field(default_factory=dict)  # live tasks by state word
    reasons: dict[str, int] = field(default_factory=dict)  # pending tasks by SLURM's reason

    @property
    def running(self) -> int:
        return self.states.get("RUNNING", 0)

    @property
    def pending(self) -> int:
        return self.states.get("PENDING", 0)


def parse_queue(text: str) -> list[QueuedJob]:
    """Lines of `squeue -h -t all -o SQUEUE_FORMAT` summed per job, in job id order: a pending
    range row ('12_[3-9%4]') counts as its 7 tasks; tasks past the live states (finished ones
    squeue still remembers) are left out. The name is the last field, the reason everything
    between the state and it (a reason is free text)."""
    states: dict[str, Counter[str]] = {}
    reasons: dict[str, Counter[str]] = {}
    meta: dict[str, tuple[str, bool]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 7:
            continue
        jobid, state, reason, name = parts[0], parts[4], "|".join(parts[5:-1]).strip(), parts[-1].strip()
        if reason.startswith("(") and reason.endswith(")"):  # as %R prints it, should a site's squeue
            reason = reason[1:-1]
        try:
            base, idx, _ = _task_key(jobid)
        except ValueError:  # not a job id this parser knows (a heterogeneous job's 12+0)
            continue
        word = state.split()[0] if state.strip() else UNKNOWN
        meta.setdefault(base, (name, idx is not None))
        states.setdefault(base, Counter())
        reasons.setdefault(base, Counter())
        if word not in LIVE_STATES:
            continue
        n = 1 if idx is None else len(idx)
        states[base][word] += n
        if word == "PENDING" and reason and reason != "None":
            reasons[base][reason] += n
    order = sorted(meta, key=lambda j: (len(j), j))  # numeric order of digit strings
    return [QueuedJob(j, meta[j][0], meta[j][1], dict(states[j]), dict(reasons[j].most_common()))
            for j in order if states[j]]


def parse_sacct(text: str) -> dict[Key, TaskState]:
    """Lines of `sacct -X -n -P -j ids -o JobID,JobIDRaw,State,ExitCode[,Reason]`."""
    out: dict[Key, TaskState] = {}
    for jobid, _raw, state, _exit, *rest in _rows(text, 4):
        _add(out, jobid, state, rest[0] if rest else "")
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
        if whole_sa is not None and (whole_sa.ok or whole_sa.state in LIVE_STATES):
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
                out[(job, i)] = TaskState(UNKNOWN, "", True)
    return out


def duration_s(text: str) -> float | None:
    """A duration as squeue prints it (%L, %l: [D-]HH:MM:SS or MM:SS) in seconds; None for UNLIMITED,
    INVALID or nothing."""
    text = text.strip()
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    if not days.isdigit() or not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    if len(parts) == 1:  # minutes alone
        seconds *= 60
    return float(int(days) * 86400 + seconds)
