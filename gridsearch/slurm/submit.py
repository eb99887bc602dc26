"""sbatch for one stage array: the script, its options, and splitting at the cluster's MaxArraySize.

The worker command line holds paths only: the database password reaches the tasks through the
environment sbatch exports (PGPASSWORD, set in the driver by the PostgreSQL backend)."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gridsearch.spec import ExecutorSpec, StageResources

DEFAULT_RESOURCES: dict[str, StageResources] = {
    "segment": StageResources(cpus=1, mem="8G", time="01:00:00"),
    "link": StageResources(cpus=1, mem="8G", time="01:00:00"),
    "solve": StageResources(cpus=1, mem="8G", time="04:00:00"),
    "server": StageResources(cpus=2, mem="4G", time="7-00:00:00"),
}


class SbatchError(RuntimeError):
    """sbatch refused a submission; the message holds its stderr."""


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


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """Array indices must be below MaxArraySize (`scontrol show config`; SLURM's default 1001)."""
    try:
        text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 1001


def split(indices: Sequence[int], limit: int) -> list[tuple[int, list[int]]]:
    """Batch indices -> [(offset, array indices)], every array index < limit; batch = index + offset."""
    chunks: dict[int, list[int]] = {}
    for b in sorted(set(indices)):
        off = (b // limit) * limit
        chunks.setdefault(off, []).append(b - off)
    return sorted(chunks.items())


@dataclass
class ArrayRequest:
    """One sbatch call: a stage's batch indices (already below MaxArraySize after `offset`)."""

    name: str
    stage: str
    indices: list[int]  # array indices; the batch is index + offset
    offset: int
    worker_args: list[str]  # after `python -m gridsearch.worker`, without --batch
    log_dir: Path
    script_dir: Path
    after: list[str] = field(default_factory=list)  # job ids (afterok)

    def log_path(self, job_id: str, index: int) -> Path:
        return self.log_dir / f"{self.stage}-{job_id}_{index}.log"


def sbatch_argv(req: ArrayRequest, spec: ExecutorSpec) -> list[str]:
    res = spec.stages.get(req.stage) or DEFAULT_RESOURCES[req.stage]  # type: ignore[call-overload]
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={req.name}",
        f"--array={compact(req.indices)}%{spec.max_parallel}",
        f"--output={req.log_dir}/{req.stage}-%A_%a.log",
        f"--cpus-per-task={res.cpus}",
        f"--mem={res.mem}",
        f"--time={res.time}",
        f"--chdir={os.getcwd()}",
        "--export=ALL",
    ]
    if req.after:
        argv += [f"--dependency=afterok:{':'.join(req.after)}", "--kill-on-invalid-dep=yes"]
    if spec.partition:
        argv.append(f"--partition={spec.partition}")
    if spec.account:
        argv.append(f"--account={spec.account}")
    argv += list(spec.sbatch_args)
    return argv


def script(req: ArrayRequest, setup: Sequence[str]) -> str:
    """The task body: setup lines, then one worker call for batch = SLURM_ARRAY_TASK_ID + offset."""
    worker = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "gridsearch.worker", *req.worker_args])
    lines = ["#!/bin/bash", "set -e", *setup,
             f'echo "gridsearch {req.stage} batch $((SLURM_ARRAY_TASK_ID + {req.offset})) on $(hostname)"',
             f"exec {worker} --batch $((SLURM_ARRAY_TASK_ID + {req.offset}))", ""]
    return "\n".join(lines)


def submit(req: ArrayRequest, spec: ExecutorSpec) -> str:
    """Run sbatch and return the array's job id (the script is kept next to the logs for debugging)."""
    req.log_dir.mkdir(parents=True, exist_ok=True)
    req.script_dir.mkdir(parents=True, exist_ok=True)
    body = script(req, spec.setup)
    argv = sbatch_argv(req, spec)
    try:
        r = subprocess.run(argv, input=body, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SbatchError(f"sbatch for {req.name} did not answer in 120 s") from None
    if r.returncode != 0:
        raise SbatchError(f"sbatch for {req.name} failed: {r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    (req.script_dir / f"{req.stage}-{job_id}.sh").write_text(body)
    return job_id


def submit_plain(name: str, body: str, argv_extra: Sequence[str], log: Path) -> str:
    """A single (non-array) job, e.g. the PostgreSQL server."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", f"--chdir={os.getcwd()}",
            "--export=ALL", *argv_extra]
    r = subprocess.run(argv, input=body, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SbatchError(f"sbatch for {name} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]
