"""The SLURM executor on the real single-node cluster (tests/slurm/start-cluster.sh) with a managed
PostgreSQL server. What needs no cluster is in test_slurm_parse.py and test_slurm_chain.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import blank_last_frames, comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.slurm import job_names
from gridsearch.slurm.gateway import Poller
from gridsearch.slurm.jobs import JobStore
from gridsearch.slurm.parse import expand
from gridsearch.spec import load

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parent.parent

def _cluster_reason() -> str | None:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "no SLURM cluster: sinfo missing or not answering (tests/slurm/start-cluster.sh)"
    if r.returncode != 0:
        return f"no SLURM cluster: sinfo failed ({r.stderr.strip()[:100]})"
    if not any(s.startswith(("idle", "mixed")) for s in r.stdout.split()):
        return f"no idle SLURM node (sinfo: {r.stdout.split()})"
    if not pg_available():
        return "PostgreSQL binaries not installed"
    return None


cluster = pytest.mark.skipif(_cluster_reason() is not None, reason=_cluster_reason() or "")

SLURM = """
database: {kind: postgresql, managed: true}
executor: {kind: slurm, max_parallel: 2, poll_seconds: 1}
parallel: 1
"""
# a guard against hangs only: a sweep of 1-2 trials takes 1-4 minutes here, and a CI machine
# running the other xdist worker's tests beside it has taken 220 s for one trial
SWEEP_TIMEOUT = 900
GRID = "grid:\n  linking.max_distance: [15.0]\n  tracking.appear_weight: [-0.1, -0.5]\n"
ONE = "grid:\n  tracking.appear_weight: [-0.5]\n"


@pytest.fixture(scope="module")
def short_movie(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 frames: every stage still has several array tasks, and a trial takes ~30 s, not minutes."""
    from gridsearch.synth import generate_movie

    return generate_movie(tmp_path_factory.mktemp("short"), n_frames=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, short_movie: dict[str, Path]) -> pd.DataFrame:
    spec = write_spec(tmp_path_factory.mktemp("sref"), short_movie, name="sref", grid=GRID)
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (2, 0)
    with existing_ledger(load(spec)) as led:
        return results.table(load(spec), led)


def _sweep(spec: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _live(spec: Path) -> list[str]:
    names = ",".join(job_names(load(spec)))
    r = subprocess.run(["squeue", "-h", "-n", names, "-o", "%i|%T|%j"], capture_output=True, text=True)
    return r.stdout.split()


def _stop_server(spec: Path) -> None:
    from gridsearch.backends.postgres import managed_server
    from gridsearch.workspace import Workspace

    sw = load(spec)
    managed_server(sw, Workspace(sw.workdir)).stop()


def _wait_for_link(spec: Path, proc: subprocess.Popen[str], running: bool) -> None:
    """Until the sweep's link array is queued (or running): the moment to kill or cancel."""
    deadline = time.time() + 400
    while time.time() < deadline and not any(
            "link" in j and (not running or "RUNNING" in j) for j in _live(spec)):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.3)


def _ledger(spec: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with existing_ledger(load(spec)) as led:
        assert led is not None
        df = results.table(load(spec), led)
        rows = pd.DataFrame([r.__dict__ for r in JobStore(led.engine).rows()])
    return df, rows


def _tasks(rows: pd.DataFrame) -> list[tuple[str, str, int]]:
    """(trial, stage, batch) for every submitted task."""
    return [(r.trial_key, r.stage, i + r.offset) for r in rows.itertuples() for i in expand(r.indices)]


@cluster
def test_slurm_sweep_matches_sqlite_and_leaves_queue_empty(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    spec = write_spec(open_tmp, short_movie, name="sl", grid=GRID, extra=SLURM)
    proc = _sweep(spec)
    _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
    try:
        assert proc.returncode == 0, err
        assert _live(spec) == []  # server job included
        assert not (load(spec).workdir / "postgres.ready").exists()
        assert list((load(spec).workdir / "logs" / "slurm").glob("server-*.log"))
        df, rows = _ledger(spec)
    finally:
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))
    tasks = _tasks(rows)
    assert len(tasks) == len(set(tasks)), "a task was submitted twice"
    assert set(rows.state) == {"closed"}
    # one segment + one link run, two solves; segment split as batch 0 then the rest
    assert sorted(rows.stage) == ["link", "segment", "segment", "solve", "solve"]
    assert set(rows[rows.stage == "segment"].indices) == {"0", "1-3"}
    logs = list((load(spec).workdir / "logs" / "slurm").glob("link-*_*.log"))
    assert len(logs) == 3


@cluster
def test_kill_driver_then_reattach(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    """No ULTRACK_DB_PW: queued tasks keep the random password they were submitted with; the next
    driver reads it from the password file its predecessor left and re-attaches them."""
    spec = write_spec(open_tmp, short_movie, name="slkill", grid=GRID, extra=SLURM)
    pw = {"ULTRACK_DB_PW": ""}
    proc = _sweep(spec, pw)
    try:
        _wait_for_link(spec, proc, running=True)
        assert any("link" in j for j in _live(spec)), "never saw the link array run"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _live(spec), "the arrays died with the driver"
        proc = _sweep(spec, pw)
        _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
        assert proc.returncode == 0, err
        assert _live(spec) == []
        df, rows = _ledger(spec)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_server(spec)
    tasks = _tasks(rows)
    assert len(tasks) == len(set(tasks)), f"a task was submitted twice: {sorted(tasks)}"
    assert len(set(rows.job_id)) == len(rows)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))


@cluster
def test_permanent_failure_fails_the_trial_without_hanging(
    open_tmp: Path, short_movie: dict[str, Path]
) -> None:
    spec = write_spec(open_tmp, short_movie, name="slfail", grid=ONE, extra=SLURM)
    t0 = time.time()
    proc = _sweep(spec, {"GRIDSEARCH_FAIL": "link:1"})
    _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
    try:
        assert proc.returncode == 1, err
        assert time.time() - t0 < 300  # a hang guard, not a speed test: a loaded 2-core machine took 154 s
        assert _live(spec) == [], "dependents of the failed array hang"
        df, rows = _ledger(spec)
    finally:
        _stop_server(spec)
    assert set(df.state) == {"failed"}
    error = df.error.iloc[0]
    assert "link batch 1 failed" in error and "injected failure in link batch 1" in error
    assert "/logs/slurm/link-" in error  # names the log file
    assert list(rows[rows.stage == "link"].indices) == ["0-2", "1"]


@cluster
@pytest.mark.switches_cluster_mode
def test_with_accounting_slurmdbd(open_tmp: Path, short_movie: dict[str, Path]) -> None:
    """Switches the cluster to slurmdbd mode (sacct answers) and back at the end."""
    script_path = ROOT / "tests" / "slurm" / "start-cluster.sh"
    r = subprocess.run(["bash", str(script_path), "--accounting"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot switch the cluster to accounting mode: {r.stderr.strip()[-200:]}")
    try:
        assert subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0
        spec = write_spec(open_tmp, short_movie, name="sldbd", grid=ONE, extra=SLURM)
        once = open_tmp / "once"
        proc = _sweep(spec, {"GRIDSEARCH_FAIL": f"segment:2:{once}"})
        _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
        try:
            assert proc.returncode == 0, err
            df, rows = _ledger(spec)
        finally:
            _stop_server(spec)
        assert set(df.state) == {"done"}
        assert list(rows[rows.stage == "segment"].indices) == ["0", "1-3", "2"]
        poller = Poller(job_names(load(spec)))
        states = poller.poll({r.job_id: expand(r.indices) for r in rows.itertuples()})
        assert poller.accounting is True and poller.calls == 1
        assert sum(s.ok for s in states.values()) >= 5
    finally:
        subprocess.run(["bash", str(script_path)], capture_output=True, text=True)


@cluster
def test_plan_shows_the_arrays_each_trial_submits(open_tmp: Path, short_movie: dict[str, Path]) -> None:
    import json

    spec = write_spec(open_tmp, short_movie, name="slplan", grid=GRID, extra=SLURM)
    r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "plan", "--json", str(spec)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    trials = json.loads(r.stdout)["trials"]
    assert trials[0]["jobs"] == ["segment: array 0 %2, then array 1-3 %2", "link: array 0-2 %2",
                                 "solve: array 0 %2"]
    assert trials[1]["jobs"] == ["solve: array 0 %2"]
    assert not (load(spec).workdir).exists()  # a dry run touches nothing


@cluster
def test_cancel_withdraws_every_job_and_the_next_sweep_recovers(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    spec = write_spec(open_tmp, short_movie, name="slcancel", grid=GRID, extra=SLURM)
    pw = {"ULTRACK_DB_PW": "pw-" + os.urandom(8).hex()}
    proc = _sweep(spec, pw)
    try:
        _wait_for_link(spec, proc, running=False)
        r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "cancel", str(spec)],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, **pw})
        assert r.returncode == 0 and "cancelled" in r.stdout, r.stderr
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        deadline = time.time() + 30
        while _live(spec) and time.time() < deadline:
            time.sleep(0.5)
        assert _live(spec) == []
        proc = _sweep(spec, pw)
        _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
        assert proc.returncode == 0, err
        df, _rows = _ledger(spec)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))


def _server_job_elsewhere(spec: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sweep's server job runs as job 4242 on node042 (as SLURM says), and this shell has no
    ULTRACK_DB_PW: what a login node sees. Returns the workdir."""
    from gridsearch.backends import slurm_server as server

    ws = load(spec).workdir
    (ws / "postgres").mkdir(parents=True)
    (ws / server.READY).write_text("4242 node042:5999\n")
    monkeypatch.setattr(server, "job_state", lambda job: "RUNNING")
    monkeypatch.delenv("ULTRACK_DB_PW", raising=False)
    return ws


def test_view_of_a_server_job_on_another_node_never_starts_a_second_server(
    open_tmp: Path, short_movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """status/results must not start a local postmaster on the shared data directory."""
    from gridsearch.engine import existing_ledger
    from gridsearch.postgres import PostgresError

    spec = write_spec(open_tmp, short_movie, name="slremote", grid=ONE, extra=SLURM)
    ws = _server_job_elsewhere(spec, monkeypatch)
    with pytest.raises(PostgresError, match=r"SLURM job 4242 on node042:5999.*ULTRACK_DB_PW"), \
            existing_ledger(load(spec)):
        pass
    monkeypatch.setenv("ULTRACK_DB_PW", "x")
    # with the password it tries TCP to that node, not a local start
    with pytest.raises(PostgresError, match="node042:5999"), existing_ledger(load(spec)):
        pass
    assert not (ws / "postgres" / "data").exists()


def test_cancel_needs_no_password_on_a_login_node(
    open_tmp: Path, short_movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server job runs on another node and this shell has no ULTRACK_DB_PW: cancel still
    withdraws by job name and leaves its request for the driver (it used to fail on the ledger)."""
    from click.testing import CliRunner

    from gridsearch.cli import main
    from gridsearch.workspace import Workspace

    spec = write_spec(open_tmp, short_movie, name="slcancelremote", grid=ONE, extra=SLURM)
    ws = _server_job_elsewhere(spec, monkeypatch)
    r = CliRunner().invoke(main, ["cancel", str(spec)])
    assert r.exit_code == 0 and "cancelled 0 job(s)" in r.output, r.output
    assert Workspace(ws).cancel_request.exists()
    assert not (ws / "postgres" / "data").exists()


@cluster
def test_reattach_refuses_arrays_whose_task_indices_meant_other_frames(
    open_tmp: Path, short_movie: dict[str, Path]
) -> None:
    """Arrays a killed driver submitted with frames_per_batch 1, a new driver with 2: queued tasks
    would read the trial's rewritten config.toml with their old indices and skip frames."""
    from gridsearch.backends.base import Backend
    from gridsearch.executors.base import ExecutorContext
    from gridsearch.executors.slurm import SlurmExecutor
    from gridsearch.ledger import Ledger
    from gridsearch.stages import Stage
    from gridsearch.workspace import Workspace

    def executor(frames: int) -> tuple[SlurmExecutor, Ledger]:
        extra = SLURM.replace("poll_seconds: 1}", f"poll_seconds: 1, frames_per_batch: {frames}}}")
        sweep = load(write_spec(open_tmp, short_movie, name="slframes", grid=ONE, extra=extra))
        ws = Workspace(sweep.workdir)
        ws.root.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(f"sqlite:///{ws.state_db}", sweep.name)
        return SlurmExecutor(ExecutorContext(sweep, ws, Backend(ws, ledger.url), ledger)), ledger

    old, ledger = executor(1)
    fps = {s: f"fp-{s.label}" for s in Stage}
    runs = ledger.open_stage_runs("main", "k", fps, [Stage.SEGMENT, Stage.LINK], {})
    for stage, run in runs.items():
        old.store.add("k", stage.label, 0, f"99999{run}", "0-3", 0, 0, run, frames_per_batch=1)
    assert old.reattach("k", Stage.SEGMENT, "main") == runs  # same n, same database: adopted
    ledger.close()
    new, ledger = executor(2)
    assert new.reattach("k", Stage.SEGMENT, "main") == {}
    assert {r.state for r in new.store.rows()} == {"closed"}
    # arrays a killed driver's branch left writing into a fork are never adopted for another database
    fork = ledger.open_stage_runs("f1", "k", fps, [Stage.LINK], {})
    new.store.add("k", "link", 0, "9999913", "0-3", 0, 0, fork[Stage.LINK], frames_per_batch=2)
    assert new.reattach("k", Stage.LINK, "main") == {}
    assert {r.state for r in new.store.rows()} == {"closed"}
    ledger.close()


FLAKY_SQUEUE = """#!/bin/bash
# squeue while slurmctld is overloaded: it times out as long as the flag file exists
if [ -e {flag} ]; then
  echo "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation" >&2
  exit 1
fi
exec {real} "$@"
"""


def _saved_job_files() -> list[Path]:
    """What slurmctld keeps of queued jobs (their scripts and environments)."""
    text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    state_dir = Path(next(ln.split("=", 1)[1].strip() for ln in text.splitlines()
                          if ln.startswith("StateSaveLocation")))
    return [f for f in state_dir.rglob("*") if f.is_file() and "job." in str(f)]


def _node(state: str, check: bool = True) -> None:
    """drain / resume the test cluster's only node (resuming an idle node is an error to SLURM)."""
    subprocess.run(["scontrol", "update", "nodename=localhost", f"state={state}", "reason=gs-test"],
                   check=check, capture_output=True)


@cluster
def test_queue_waits_and_scheduler_outages_are_waited_out(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    """One wait, several faults: the server job pends on a drained node for longer than the time it
    may take to start once running, squeue times out while it pends and again mid-sweep. The sweep
    says why it waits and finishes with every trial done (it used to fail: 'not ready after 300 s',
    and every remaining trial failed on a squeue outage)."""
    spec = write_spec(open_tmp, short_movie, name="slqueue", grid=GRID, extra=SLURM)
    bin_dir, flag = open_tmp / "bin", open_tmp / "squeue.down"
    bin_dir.mkdir()
    wrapper = bin_dir / "squeue"
    wrapper.write_text(FLAKY_SQUEUE.format(flag=flag, real=shutil.which("squeue")))
    wrapper.chmod(0o755)
    password = "pw-" + os.urandom(8).hex()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GRIDSEARCH_SERVER_READY_S": "15",
           "ULTRACK_DB_PW": password}
    _node("drain")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", str(spec)],
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)
        time.sleep(5)
        flag.touch()  # the scheduler times out while the server job pends
        time.sleep(8)
        flag.unlink()
        time.sleep(15)  # pending 28 s in all: more than the 15 s it may take once running
        assert proc.poll() is None, proc.communicate()
        # slurmctld saved the pending job's environment: the password is not in it
        assert _saved_job_files() and not any(password.encode() in f.read_bytes() for f in _saved_job_files())
        _node("resume")
        _wait_for_link(spec, proc, running=False)
        flag.touch()  # and again mid-sweep, with arrays queued
        time.sleep(12)
        flag.unlink()
        out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
    finally:
        flag.unlink(missing_ok=True)
        _node("resume", check=False)
        _stop_server(spec)
    assert proc.returncode == 0, err
    assert "is PENDING (" in out and "waiting" in out, out
    assert "Socket timed out" in out and "waiting for the scheduler" in out, out
    df, _rows = _ledger(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))


FORGETFUL_SQUEUE = """#!/bin/bash
# squeue as after MinJobAge on a cluster without accounting: finished tasks are forgotten
{real} "$@" | grep -v '|COMPLETED|'
exit ${{PIPESTATUS[0]}}
"""


@pytest.fixture(scope="module")
def last_frame_empty(
    tmp_path_factory: pytest.TempPathFactory, short_movie: dict[str, Path]
) -> dict[str, Path]:
    """short_movie with no cells in its last frame: segment batch 3 writes zero nodes and link batch 2
    zero links, yet both are complete."""
    return blank_last_frames(short_movie, tmp_path_factory.mktemp("empty"), 1)


@cluster
def test_forgotten_tasks_and_empty_batches_are_done_when_acknowledged(
    open_tmp: Path, last_frame_empty: dict[str, Path]
) -> None:
    """The driver's squeue drops finished tasks (UNKNOWN to the driver) and two batches leave no rows:
    the workers' acknowledgements alone say they are done, so nothing is resubmitted and the
    results equal those of the same sweep seen through the real squeue."""
    real = shutil.which("squeue")
    assert real is not None
    bin_dir = open_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FORGETFUL_SQUEUE.format(real=real))
    (bin_dir / "squeue").chmod(0o755)
    plain = write_spec(open_tmp / "plain", last_frame_empty, name="slempty", grid=ONE, extra=SLURM)
    forgetful = write_spec(open_tmp / "forgetful", last_frame_empty, name="slforget", grid=ONE, extra=SLURM)
    procs = [_sweep(plain), _sweep(forgetful, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})]
    try:
        for proc in procs:
            _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
            assert proc.returncode == 0, err
        (want, _), (got, rows) = _ledger(plain), _ledger(forgetful)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        _stop_server(plain)
        _stop_server(forgetful)
    pd.testing.assert_frame_equal(comparable(got), comparable(want))
    assert sorted(rows.stage) == ["link", "segment", "segment", "solve"] and set(rows.attempt) == {0}
    scripts = load(forgetful).workdir / "logs" / "slurm" / "scripts"
    assert sorted(p.name.split("-")[0] for p in scripts.glob("*.sh")) == [
        "link", "segment", "segment", "server", "solve"], "something was resubmitted"
    # the driver really saw its finished tasks forgotten; frame 3 really had no cells
    names = ",".join(job_names(load(forgetful)))
    seen = subprocess.run([str(bin_dir / "squeue"), "-h", "-t", "all", "-n", names, "-o", "%i|%T|"],
                          capture_output=True, text=True).stdout
    assert "COMPLETED" not in seen and "COMPLETED" in subprocess.run(
        [real, "-h", "-t", "all", "-n", names, "-o", "%i|%T|"], capture_output=True, text=True).stdout
    tracks = pd.read_csv(got.tracks_csv.iloc[0])
    assert tracks.t.max() == 2


@cluster
def test_server_killed_mid_stage_stops_in_one_line_and_resumes(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    """The server job SIGKILLed while link tasks write: no trial is recorded failed (a database
    gone is not the parameters' fault), the sweep stops in one line, and the same command starts
    a new server job on the same data directory (PostgreSQL recovers it) and finishes."""
    spec = write_spec(open_tmp, short_movie, name="slskill", grid=GRID, extra=SLURM)
    proc = _sweep(spec)
    try:
        _wait_for_link(spec, proc, running=True)
        server = next(j.split("|")[0] for j in _live(spec) if j.endswith("-server"))
        subprocess.run(["scancel", "-s", "KILL", "--full", server], check=True)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: database error: "), err
        assert "run it again to resume" in lines[0], err
        resumed = _sweep(spec)
        _out, err = resumed.communicate(timeout=SWEEP_TIMEOUT)
    finally:
        for p in (proc, locals().get("resumed")):
            if p is not None and p.poll() is None:
                p.kill()
        _stop_server(spec)
    assert resumed.returncode == 0, err
    df, rows = _ledger(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))
    with existing_ledger(load(spec)) as led:
        assert led is not None
        runs = pd.DataFrame(led.stage_runs())
    assert "failed" not in set(runs.state), runs
    assert (runs[runs.stage == "segment"].state == "done").sum() == 1, runs  # kept, not redone



UNSURE_SBATCH = """#!/bin/bash
# sbatch on a busy cluster, once per stage named in {flags}: for 'link' the request reaches
# slurmctld but its answer does not; for 'solve' neither does (sbatch says the same both times).
# Every job really submitted is logged to {log}.
for stage in link solve; do
  if [[ "$*" == *"-$stage "* ]] && mkdir {flags}/$stage 2>/dev/null; then
    [[ $stage == link ]] && {real} "$@" >>{log}
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2
    exit 1
  fi
done
out=$({real} "$@") || exit $?
echo "$out" >>{log}
echo "$out"
"""
HARSH = """
database: {{kind: postgresql, managed: true}}
executor:
  kind: slurm
  max_parallel: 2
  poll_seconds: 1
  stages: {{link: {{time: "00:01:00"}}}}
  setup:  # link batch 1 stalls past its time limit once (SLURM kills it: TIMEOUT)
    - 'if [[ $SLURM_JOB_NAME == *-link && $SLURM_ARRAY_TASK_ID == 1 ]] && mkdir {once}; then sleep 600; fi'
"""


def _slurm_conf(key: str, value: str) -> str:
    """Set one slurm.conf key and reconfigure slurmctld; returns the old value."""
    conf = Path("/etc/slurm/slurm.conf")
    text = conf.read_text()
    old = next(ln for ln in text.splitlines() if ln.startswith(f"{key}="))
    conf.write_text(text.replace(old, f"{key}={value}"))
    subprocess.run(["scontrol", "reconfigure"], check=True, capture_output=True)
    return old.split("=", 1)[1]


@cluster
def test_a_harsh_cluster_forgets_times_out_drains_and_answers_sbatch_late(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame
) -> None:
    """One sweep, the faults of a busy real cluster at once:
    - slurmctld forgets finished jobs after 2 s (MinJobAge, no accounting);
    - sbatch times out after submitting the link array (adopted by its tag, not submitted twice)
      and times out without submitting a solve array (submitted again);
    - an array bearing the sweep's name that no driver recorded (a driver killed between sbatch
      and its ledger write) is cancelled before anything runs;
    - a link task is killed by its time limit: that batch alone is resubmitted;
    - the only node is drained for a while mid-sweep.
    The results equal the plain run; every job SLURM ran is one the ledger knows."""
    once = open_tmp / "stalled-once"
    spec = write_spec(open_tmp, short_movie, name="slharsh", grid=GRID, extra=HARSH.format(once=once))
    bin_dir, flags, log = open_tmp / "bin", open_tmp / "flags", open_tmp / "submitted"
    bin_dir.mkdir()
    flags.mkdir()
    (bin_dir / "sbatch").write_text(UNSURE_SBATCH.format(flags=flags, log=log, real=shutil.which("sbatch")))
    (bin_dir / "sbatch").chmod(0o755)
    segment = next(n for n in job_names(load(spec)) if n.endswith("-segment"))
    stray = subprocess.run(["sbatch", "--parsable", "--hold", f"--job-name={segment}", "--array=0-1",
                            "-o", "/dev/null", "--wrap", "sleep 600"],
                           capture_output=True, text=True, check=True).stdout.strip()
    old_age = _slurm_conf("MinJobAge", "2")
    proc = _sweep(spec, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        _wait_for_link(spec, proc, running=False)
        _node("drain")
        time.sleep(10)
        assert proc.poll() is None, proc.communicate()[1]
        _node("resume")
        _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
        stray_state = subprocess.run(["squeue", "-h", "-t", "all", "-j", stray, "-o", "%T"],
                                     capture_output=True, text=True).stdout.split()
    finally:
        _node("resume", check=False)
        _slurm_conf("MinJobAge", old_age)
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", stray])
        _stop_server(spec)
    assert proc.returncode == 0, err
    assert once.exists() and sorted(p.name for p in flags.iterdir()) == ["link", "solve"], "no fault fired"
    assert stray_state in ([], ["CANCELLED"]), stray_state  # cancelled (and maybe forgotten since)
    df, rows = _ledger(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))
    retried = rows[rows.attempt > 0]
    assert list(retried.stage) == ["link"] and list(retried.indices) == ["1"], rows
    scripts = load(spec).workdir / "logs" / "slurm" / "scripts"
    server = {p.stem.split("-")[1] for p in scripts.glob("server-*.sh")}
    assert set(log.read_text().split()) == set(rows.job_id) | server, (log.read_text(), rows)
    # slurmctld really forgot: the first segment array is unknown to it now
    gone = subprocess.run(["squeue", "-h", "-t", "all", "-j", rows.job_id.iloc[0]],
                          capture_output=True, text=True)
    assert gone.stdout.strip() == "", gone.stdout


@cluster
def test_an_sbatch_refusal_stops_the_sweep_in_one_line(open_tmp: Path, short_movie: dict[str, Path]) -> None:
    """A link array no node can take: every trial would meet the same refusal, so the sweep stops
    with sbatch's reason instead of failing trial after trial; the trial stays resumable."""
    extra = SLURM.replace("poll_seconds: 1}", 'poll_seconds: 1, stages: {link: {mem: "100000G"}}}')
    spec = write_spec(open_tmp, short_movie, name="slrefused", grid=GRID, extra=extra)
    proc = _sweep(spec)
    try:
        _out, err = proc.communicate(timeout=SWEEP_TIMEOUT)
        df, _rows = _ledger(spec)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_server(spec)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "sbatch for" in lines[0] and "-link failed:" in lines[0], err
    assert "failed" not in set(df.state) and "done" not in set(df.state), df
