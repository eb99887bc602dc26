"""Where SLURM jobs of a sweep write: every job script and log name is spelled here, once.

sbatch needs patterns (%A array job, %a task, %j job); the driver, reading a failed task's log,
needs the same names with the ids filled in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gridsearch.workspace import Workspace

SERVER = "server"  # the PostgreSQL server job's name in logs and scripts


@dataclass(frozen=True)
class JobPaths:
    logs: Path
    scripts: Path | None = None  # None: logs/scripts

    @classmethod
    def of(cls, ws: Workspace) -> JobPaths:
        return cls(ws.logs / "slurm")

    def array_output(self, stage: str) -> Path:
        """sbatch --output for an array: one log per task."""
        return self.logs / f"{stage}-%A_%a.log"

    def task_log(self, stage: str, job_id: str, index: int) -> Path:
        return self.logs / f"{stage}-{job_id}_{index}.log"

    def job_output(self, what: str) -> Path:
        """sbatch --output for a single job."""
        return self.logs / f"{what}-%j.log"

    def job_log(self, what: str, job_id: str) -> Path:
        return self.logs / f"{what}-{job_id}.log"

    def server_log(self, job_id: str) -> Path:
        return self.job_log(SERVER, job_id)

    def script(self, what: str, job_id: str) -> Path:
        """The body sbatch ran, kept for debugging (it holds no secret)."""
        return (self.scripts or self.logs / "scripts") / f"{what}-{job_id}.sh"
