"""`status` on a SLURM sweep: what the queue holds of it (one squeue call, a fake one here: no
cluster), tasks running and pending per job and why they wait, at 80 columns; a scheduler that
does not answer is one line, not a failed view."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import EXAMPLE_GRID, write_spec

from gridsearch import views
from gridsearch.cli import main
from gridsearch.slurm import job_name, sweep_tag
from gridsearch.slurm.jobs import JobRow
from gridsearch.slurm.parse import parse_queue
from gridsearch.spec import load

SLURM = "database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm, max_parallel: 4}\n"

# squeue -h -t all -o '%i|%A|%F|%K|%T|%r|%j' as SLURM 22.05 prints it, TAG for the sweep's tag
QUEUE = """\
1200|1200|1200|N/A|PENDING|Priority|TAG-driver
1201|1201|1201|N/A|RUNNING|None|TAG-server
1210_[3-9%4]|1210|1210|3-9%4|PENDING|JobArrayTaskLimit|TAG-segment
1210_0|1211|1210|0|RUNNING|None|TAG-segment
1210_1|1212|1210|1|RUNNING|None|TAG-segment
1210_2|1213|1210|2|COMPLETED|None|TAG-segment
1214_[0-8%4]|1214|1214|0-8%4|PENDING|Dependency|TAG-link
1220_[0-4,7]|1220|1220|0-4,7|PENDING|QOSMaxJobsPerUserLimit|TAG-link
1220_5|1221|1220|5|PENDING|ReqNodeNotAvail, UnavailableNodes:node[01-02]|TAG-link
1220_6|1222|1220|6|COMPLETING|None|TAG-link
"""


def _row(job_id: str, trial: str, stage: str, attempt: int = 0) -> JobRow:
    return JobRow(id=int(job_id), trial_key=trial, stage=stage, phase=0, job_id=job_id, indices="0-9",
                  offset=0, attempt=attempt, state="active", submitted_at=0.0, run_id=1, frames_per_batch=1)


def test_queue_lines_name_the_trial_and_why_tasks_wait() -> None:
    queued = parse_queue(QUEUE.replace("TAG", "gs-x-abc123"))
    rows = [_row("1210", "0c367ed27bd8", "segment"), _row("1214", "0c367ed27bd8", "link"),
            _row("1220", "d66740a77c26", "link", attempt=1)]
    jobs = views.queue_jobs("gs-x-abc123", queued, rows)
    assert [(j["what"], j["job_id"], j["trial_key"]) for j in jobs] == [
        ("driver", "1200", None), ("server", "1201", None), ("segment", "1210", "0c367ed27bd8"),
        ("link", "1214", "0c367ed27bd8"), ("link", "1220", "d66740a77c26")]
    lines = views.queue_lines({"error": None, "jobs": jobs}, 80)
    assert lines == [
        "slurm: 5 jobs of this sweep queued or running",
        "  driver 1200: pending (Priority)",
        "  server 1201: running",
        "  segment 1210, trial 0c367ed27bd8: 2 running, 7 pending (JobArrayTaskLimit)",
        "  link 1214, trial 0c367ed27bd8: 9 pending (Dependency)",
        "  link 1220, trial d66740a77c26, retry 1: 7 pending, 1 completing (6",
        "      QOSMaxJobsPerUserLimit; 1 ReqNodeNotAvail, UnavailableNodes:node[01-02])",
    ]
    # an array of the sweep's names that the ledger never recorded (a driver killed after sbatch)
    jobs = views.queue_jobs("gs-x-abc123", queued, rows[:1])
    assert "  link 1214, recorded by no driver: 9 pending (Dependency)" in views.queue_lines(
        {"error": None, "jobs": jobs}, 80)
    empty = views.queue_lines({"error": None, "jobs": []}, 80)
    assert empty == ["slurm: nothing of this sweep is queued or running"]


@pytest.fixture
def squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A fake squeue on PATH: `answer(text, code)` sets what it prints (to stderr when it fails);
    every call's arguments are logged, one line each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "squeue.calls"

    def answer(text: str, code: int = 0) -> Path:
        out = tmp_path / "squeue.out"
        out.write_text(text)
        stream = ">&2" if code else ""
        (bin_dir / "squeue").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n'
                                        f"cat {shlex.quote(str(out))} {stream}\nexit {code}\n")
        (bin_dir / "squeue").chmod(0o755)
        return calls

    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return answer


def test_status_shows_queued_and_running_jobs_at_80_columns(tmp_path: Path, movie: dict[str, Path],
                                                              squeue) -> None:  # type: ignore[no-untyped-def]
    spec = write_spec(tmp_path, movie, name="slstatus", grid=EXAMPLE_GRID, extra=SLURM)
    sweep = load(spec)
    tag = sweep_tag(sweep)
    calls = squeue(QUEUE.replace("TAG", tag))
    r = CliRunner().invoke(main, ["status", str(spec)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines if str(sweep.workdir) not in ln) <= 80  # a path is never cut
    at = lines.index("slurm: 5 jobs of this sweep queued or running")
    assert lines[at + 1:at + 5] == [
        "  driver 1200: pending (Priority)",
        "  server 1201: running",
        "  segment 1210: 2 running, 7 pending (JobArrayTaskLimit)",  # no ledger yet: no trial
        "  link 1214: 9 pending (Dependency)",
    ]
    assert lines[at + 5].startswith("  link 1220: 7 pending, 1 completing (6 QOSMaxJobsPerUserLimit;")
    # one call, for every name the sweep's jobs carry, the driver's too
    argv = calls.read_text().splitlines()
    assert len(argv) == 1
    names = argv[0].split(" -n ")[1].split()[0].split(",")
    assert set(names) == {job_name(sweep, w) for w in ("segment", "link", "solve", "server", "driver")}

    doc = json.loads(CliRunner().invoke(main, ["status", "--json", str(spec)]).stdout)["slurm"]
    assert doc["error"] is None
    seg = next(j for j in doc["jobs"] if j["job_id"] == "1210")
    got = (seg["what"], seg["running"], seg["pending"], seg["reasons"])
    assert got == ("segment", 2, 7, {"JobArrayTaskLimit": 7})
    assert doc["jobs"][1] == {"job_id": "1201", "name": f"{tag}-server", "what": "server", "array": False,
                              "trial_key": None, "attempt": None, "recorded": None, "running": 1,
                              "pending": 0, "states": {"RUNNING": 1}, "reasons": {}}


def test_status_says_when_the_scheduler_does_not_answer(tmp_path: Path, movie: dict[str, Path],
                                                         squeue) -> None:  # type: ignore[no-untyped-def]
    spec = write_spec(tmp_path, movie, name="sldown", grid=EXAMPLE_GRID, extra=SLURM)
    sweep = load(spec)
    squeue("slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", code=1)
    r = CliRunner().invoke(main, ["status", str(spec)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines if str(sweep.workdir) not in ln) <= 80  # a path is never cut
    at = lines.index("slurm: scheduler not answering: squeue failed: slurm_load_jobs error: Unable to")
    assert lines[at + 1] == "  contact slurm controller (connect failure)"
    assert "trials: done 0, failed 0, running 0, pending 12" in lines  # the rest of the view stands
    doc = json.loads(CliRunner().invoke(main, ["status", "--json", str(spec)]).stdout)
    assert doc["slurm"]["jobs"] == [] and "Unable to contact slurm controller" in doc["slurm"]["error"]
    # nothing queued
    squeue("")
    r = CliRunner().invoke(main, ["status", str(spec)], env={"COLUMNS": "80"})
    assert "slurm: nothing of this sweep is queued or running" in r.stdout.splitlines()


def test_a_view_that_cannot_tell_whether_the_server_job_runs_says_so(
    open_tmp: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server job's ready file names a job, and squeue cannot be run (here: not on PATH, as on
    a node without SLURM's clients; a timeout ends the same way): guessing "not running" could
    start a second server on its files, so the view stops in one line."""
    spec = write_spec(open_tmp, movie, name="sldown2", grid=EXAMPLE_GRID, extra=SLURM)
    workdir = load(spec).workdir
    (workdir / "postgres").mkdir(parents=True)
    (workdir / "postgres.ready").write_text("4242 node07:5433\n")
    empty = open_tmp / "no-slurm"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = CliRunner().invoke(main, ["status", str(spec)], env={"COLUMNS": "80"})
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines() == [
        f"error: {workdir}: cannot tell whether the sweep's server job runs (squeue: No such file or "
        "directory); try again once the scheduler answers"]
