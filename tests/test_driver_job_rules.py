"""When a driver job queues its successor, without a cluster: the job's clock, a cancel, the sbatch
line. The real chain of driver jobs runs in test_slurm_driver_job.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_spec

from gridsearch.slurm import driver_job, gateway
from gridsearch.slurm.driver_job import JobClock, carry_on
from gridsearch.slurm.parse import duration_s
from gridsearch.spec import load
from gridsearch.workspace import Workspace


@pytest.mark.parametrize(("text", "seconds"), [
    ("1-02:03:04", 93784.0), ("12:34", 754.0), ("1:02:03", 3723.0), ("0:00", 0.0),
    ("UNLIMITED", None), ("INVALID", None), ("NOT_SET", None), ("", None),
])
def test_squeue_durations(text: str, seconds: float | None) -> None:
    assert duration_s(text) == seconds


@pytest.fixture
def sweep(tmp_path: Path, movie: dict[str, Path]):  # type: ignore[no-untyped-def]
    spec = write_spec(tmp_path, movie, name="dj", grid="grid:\n  tracking.appear_weight: [-0.5]\n",
                      extra="database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm}\n")
    sw = load(spec)
    Workspace(sw.workdir).root.mkdir(parents=True)
    return spec, sw


def _submissions(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def submit_job(spec, what, name, command, paths, env=None, notify=None, extra=()):  # type: ignore[no-untyped-def]
        calls.append([what, name, *command, *extra])
        return str(100 + len(calls))

    monkeypatch.setattr(gateway, "submit_job", submit_job)
    return calls


def test_a_term_near_the_limit_queues_the_successor(sweep, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    spec, sw = sweep
    calls = _submissions(monkeypatch)
    said: list[str] = []
    clock = JobClock("77", deadline=None)  # squeue could not tell: carrying on is the safe side
    assert carry_on(sw, spec, Workspace(sw.workdir), clock, said.append) == "101"
    what, name, *command = calls[0]
    assert (what, name) == ("driver", driver_job.driver_name(sw))
    assert command[-4:] == [driver_job.IN_JOB_FLAG, "--signal=B:TERM@120", "--open-mode=append",
                            "--dependency=afterany:77"]
    assert "--restart" not in command  # a successor resumes, never restarts
    assert "carries on in SLURM job 101" in said[-1]


def test_no_successor_after_a_cancel_or_a_signal_well_before_the_limit(
    sweep, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import time

    spec, sw = sweep
    ws = Workspace(sw.workdir)
    calls = _submissions(monkeypatch)
    said: list[str] = []
    far = JobClock("77", deadline=time.monotonic() + 3600)
    assert carry_on(sw, spec, ws, far, said.append) is None and "before the time limit" in said[-1]
    near = JobClock("77", deadline=time.monotonic() + 100)
    ws.cancel_request.write_text("1\n")
    assert carry_on(sw, spec, ws, near, said.append) is None and "cancelled" in said[-1]
    assert calls == []


def test_a_cancel_during_the_submission_withdraws_the_successor(
    sweep, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    spec, sw = sweep
    ws = Workspace(sw.workdir)
    cancelled: list[list[str]] = []

    def submit_job(*args, **kwargs):  # type: ignore[no-untyped-def]
        ws.cancel_request.write_text("1\n")  # `gridsearch cancel` ran meanwhile; its scancel missed it
        return "205"

    monkeypatch.setattr(gateway, "submit_job", submit_job)
    monkeypatch.setattr(gateway, "scancel_ids", cancelled.append)
    assert carry_on(sw, spec, ws, JobClock("77", None), print) is None
    assert cancelled == [["205"]]


def test_a_fixed_password_reaches_the_job_as_a_private_file(
    sweep, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    spec, sw = sweep
    ws = Workspace(sw.workdir)
    calls = _submissions(monkeypatch)
    monkeypatch.setenv("ULTRACK_DB_PW", "s3cr:et")
    driver_job.submit(sw, spec, ws, restart=True)
    assert "s3cr:et" not in " ".join(calls[0]) and "--restart" in calls[0]
    assert ws.driver_pgpass.stat().st_mode & 0o777 == 0o600
    assert ws.driver_pgpass.parent.stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("ULTRACK_DB_PW")
    driver_job.take_password(ws)
    import os

    assert os.environ.pop("ULTRACK_DB_PW") == "s3cr:et"


def test_submit_needs_a_slurm_sweep(tmp_path: Path, movie: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from gridsearch.cli import main

    spec = write_spec(tmp_path, movie, name="loc", grid="grid:\n  tracking.appear_weight: [-0.5]\n")
    r = CliRunner().invoke(main, ["sweep", "--submit", str(spec)])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"error: {spec}: executor: --submit runs the driver as a SLURM job, "
                                     "for a sweep with executor: slurm"]
    assert not (tmp_path / "runs").exists()
