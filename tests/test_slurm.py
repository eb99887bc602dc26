"""The SLURM executor: parsers on recorded outputs (no cluster), then sweeps on the real single-node
cluster (tests/slurm/start-cluster.sh) with a managed PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.slurm import job_names
from gridsearch.slurm.jobs import JobStore
from gridsearch.slurm.status import Poller, TaskState, merge, parse_sacct, parse_squeue
from gridsearch.slurm.submit import ArrayRequest, compact, expand, sbatch_argv, script, split
from gridsearch.spec import ExecutorSpec, load

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parent.parent

SQUEUE = """\
239_[2-9%2]|239|239|2-9%2|PENDING|JobArrayTaskLimit|name
239_0|247|239|0|RUNNING|None|name
236_2|244|236|2|FAILED|NonZeroExitCode|name
238_1|238|238|1|FAILED|JobLaunchFailure|name
237|237|237|N/A|CANCELLED|DependencyNeverSatisfied|name
235_0|241|235|0|TIMEOUT|TimeLimit|name
"""
SACCT = """\
24_0|30|COMPLETED|0:0
24_2|32|FAILED|1:0
27_[2-9%2]|27|PENDING|0:0
27_0|35|CANCELLED by 0|0:0
"""


# ------------------------------------------------------------------ no cluster needed
def test_parse_squeue_recorded_lines() -> None:
    s = parse_squeue(SQUEUE)
    assert s[("239", 5)] == TaskState("PENDING", "JobArrayTaskLimit", explicit=False)
    assert s[("239", 0)].live and s[("239", 0)].explicit
    assert s[("236", 2)].failed and not s[("236", 2)].dependency_failed
    assert s[("238", 1)].failed
    assert s[("237", None)].dependency_failed and s[("237", None)].failed
    assert s[("235", 0)].state == "TIMEOUT" and s[("235", 0)].failed
    assert ("239", 1) not in s


def test_parse_sacct_first_word_and_ranges() -> None:
    s = parse_sacct(SACCT)
    assert s[("24", 0)].ok
    assert s[("24", 2)].state == "FAILED"
    assert s[("27", 0)].state == "CANCELLED"  # 'CANCELLED by 0'
    assert s[("27", 9)] == TaskState("PENDING", "", explicit=False)


def test_merge_rules() -> None:
    sq = parse_squeue("239_[2-3]|239|239|2-3|PENDING|Dependency|n\n239_0|247|239|0|COMPLETED|None|n\n"
                      "237|237|237|N/A|CANCELLED|DependencyNeverSatisfied|n\n")
    # sacct listing an array as one COMPLETED plain job (right after submission): not trusted
    sa = parse_sacct("239|239|COMPLETED|0:0\n50_0|60|COMPLETED|0:0\n50_1|61|FAILED|1:0\n"
                     "51_0|70|COMPLETED|0:0\n")
    m = merge(sq, sa, {"239": [0, 1, 2, 3], "237": [0, 1], "50": [0, 1], "51": [0, 1], "99": [0]})
    assert m[("239", 0)].ok
    assert m[("239", 1)].state == "CANCELLED"  # left the range while the array is still shown
    assert m[("239", 2)].state == "PENDING"
    assert all(m[("237", i)].dependency_failed for i in (0, 1))  # a whole array cancelled as one row
    assert m[("50", 0)].ok and m[("50", 1)].state == "FAILED"  # squeue forgot them, sacct did not
    assert m[("51", 0)].state == "UNKNOWN"  # sacct lists only part of the array: not trusted
    assert m[("99", 0)].state == "UNKNOWN"


def test_array_syntax_split_and_script_have_no_secret(tmp_path: Path) -> None:
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert expand("[2-9%2]") == list(range(2, 10)) and expand("1,4-5") == [1, 4, 5]
    assert split(list(range(1, 2500)), 1001) == [
        (0, list(range(1, 1001))), (1001, list(range(0, 1001))), (2002, list(range(0, 498)))]
    os.environ["PGPASSWORD"] = "s3cret-value"
    try:
        spec = ExecutorSpec(kind="slurm", partition="debug", account="mylab", setup=["module load x"],
                            max_parallel=3, sbatch_args=["--qos=normal"])
        req = ArrayRequest("gs-x-link", "link", [0, 1, 2, 4], 1001, ["--stage", "link"], tmp_path,
                           tmp_path, after=["11", "12"])
        argv = sbatch_argv(req, spec)
        body = script(req, spec.setup)
    finally:
        del os.environ["PGPASSWORD"]
    assert "--array=0-2,4%3" in argv and "--dependency=afterok:11:12" in argv
    assert "--kill-on-invalid-dep=yes" in argv and "--partition=debug" in argv
    assert "--account=mylab" in argv and "--qos=normal" in argv
    assert "--time=01:00:00" in argv and f"--output={tmp_path}/link-%A_%a.log" in argv
    assert "module load x" in body and "$((SLURM_ARRAY_TASK_ID + 1001))" in body
    assert "s3cret" not in " ".join(argv) + body


# ------------------------------------------------------------------ the real cluster
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
"""
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
    from gridsearch.pgbackend import managed_server

    from gridsearch.workspace import Workspace

    sw = load(spec)
    managed_server(sw, Workspace(sw.workdir)).stop()


def _wait_for_link(spec: Path, proc: subprocess.Popen[str], running: bool) -> None:
    """Until the sweep's link array is queued (or running): the moment to kill or cancel."""
    deadline = time.time() + 120
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
    _out, err = proc.communicate(timeout=240)
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
    spec = write_spec(open_tmp, short_movie, name="slkill", grid=GRID, extra=SLURM)
    # queued tasks keep the password they were submitted with: it must survive the driver
    pw = {"ULTRACK_DB_PW": "pw-" + os.urandom(8).hex()}
    proc = _sweep(spec, pw)
    try:
        _wait_for_link(spec, proc, running=True)
        assert any("link" in j for j in _live(spec)), "never saw the link array run"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _live(spec), "the arrays died with the driver"
        proc = _sweep(spec, pw)
        _out, err = proc.communicate(timeout=240)
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
def test_transient_failure_is_resubmitted_alone(open_tmp: Path, short_movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, short_movie, name="slonce", grid=ONE, extra=SLURM)
    once = open_tmp / "once"
    proc = _sweep(spec, {"GRIDSEARCH_FAIL": f"link:2:{once}"})
    _out, err = proc.communicate(timeout=240)
    try:
        assert proc.returncode == 0, err
        assert once.exists()
        df, rows = _ledger(spec)
    finally:
        _stop_server(spec)
    assert set(df.state) == {"done"}
    link = rows[rows.stage == "link"]
    assert list(link.indices) == ["0-2", "2"] and list(link.attempt) == [0, 1]
    assert len(rows[rows.stage == "solve"]) == 2  # the first solve was cancelled with its dependency
    assert _live(spec) == []


@cluster
def test_permanent_failure_fails_the_trial_without_hanging(
    open_tmp: Path, short_movie: dict[str, Path]
) -> None:
    spec = write_spec(open_tmp, short_movie, name="slfail", grid=ONE, extra=SLURM)
    t0 = time.time()
    proc = _sweep(spec, {"GRIDSEARCH_FAIL": "link:1"})
    _out, err = proc.communicate(timeout=180)
    try:
        assert proc.returncode == 1, err
        assert time.time() - t0 < 150
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
        _out, err = proc.communicate(timeout=240)
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
        _out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        df, _rows = _ledger(spec)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))


def test_view_of_a_server_job_on_another_node_never_starts_a_second_server(
    open_tmp: Path, short_movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """status/results must not start a local postmaster on the shared data directory."""
    from gridsearch.engine import existing_ledger
    from gridsearch.postgres import PostgresError
    from gridsearch.slurm import server

    spec = write_spec(open_tmp, short_movie, name="slremote", grid=ONE, extra=SLURM)
    ws = load(spec).workdir
    (ws / "postgres").mkdir(parents=True)
    (ws / server.READY).write_text("4242 node042:5999\n")
    monkeypatch.setattr(server, "_job_state", lambda job: "RUNNING")
    monkeypatch.delenv("ULTRACK_DB_PW", raising=False)
    with pytest.raises(PostgresError, match=r"SLURM job 4242 on node042:5999.*ULTRACK_DB_PW"), \
            existing_ledger(load(spec)):
        pass
    monkeypatch.setenv("ULTRACK_DB_PW", "x")
    # with the password it tries TCP to that node, not a local start
    with pytest.raises(PostgresError, match="node042:5999"), existing_ledger(load(spec)):
        pass
    assert not (ws / "postgres" / "data").exists()
