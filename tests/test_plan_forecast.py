"""`plan` before submitting: SLURM jobs and array tasks (or local batches), the databases the plan
makes and how many live at once, the disk they take and the time. Counting on a SLURM sweep file
(never submitted: scontrol and sinfo are fakes), then `plan` on a real SQLite sweep, finished and
half-finished, at 80 columns."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import EXAMPLE_GRID, lab_database, lab_rows, pg_available, write_spec

from gridsearch import forecast
from gridsearch.backends.names import db_name
from gridsearch.backends.postgres import managed_server
from gridsearch.backends.slurm_server import READY
from gridsearch.branches import simulate
from gridsearch.cli import main
from gridsearch.core.secrets import write_pgpass
from gridsearch.costs import StageCost
from gridsearch.engine import plan_for, run_sweep
from gridsearch.slurm import gateway
from gridsearch.slurm.describe import describe_jobs, phase_arrays
from gridsearch.spec import Sweep, Trial, load
from gridsearch.stages import Stage
from gridsearch.workspace import Workspace

SLURM = "database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm, max_parallel: 4%s}\n"
ONE = "grid:\n  tracking.appear_weight: [-0.1]\n"  # one trial: segment, link, solve


def _slurm(tmp_path: Path, movie: dict[str, Path], name: str, executor: str = "", grid: str = ONE,
           extra: str = "") -> Sweep:
    return load(write_spec(tmp_path, movie, name=name, grid=grid, extra=SLURM % executor + extra))


def _count(sweep: Sweep, limit: int, measured: dict[Stage, StageCost] | None = None,
           going: dict[tuple[str, Stage], int] | None = None) -> forecast.Work:
    sizer = forecast.TaskSizer(sweep, measured or {})
    return forecast.slurm_work(sweep, plan_for(sweep, None), sizer, limit, going or {}, server_job=True)


def _cost(per_frame: float, startup: float) -> StageCost:
    return StageCost(batches=9, per_frame_s=per_frame, cpu_per_frame_s=per_frame, startup_s=startup,
                     peak_mb=100)


# ---- counting (a 10-frame movie) -------------------------------------------------------------------
def test_one_frame_tasks_split_at_max_array_size(tmp_path: Path, movie: dict[str, Path]) -> None:
    sweep = _slurm(tmp_path, movie, "count")
    assert sweep.shape[0] == 10
    # segment: batch 0, then 1-9; link: 0-8; solve: one window
    w = _count(sweep, limit=1001)
    assert (w.arrays, w.tasks, w.batches, w.server_job, w.sbatch) == (4, 20, 20, 1, 5)
    assert w.up_to  # nothing measured: tasks get fewer frames once a stage is
    # MaxArraySize 5: 1-9 is 1-4 + 5-9, 0-8 is 0-4 + 5-8
    w = _count(sweep, limit=5)
    assert (w.arrays, w.tasks, w.sbatch) == (6, 20, 7)
    assert w.lines()[0] == "slurm: 7 sbatch calls (6 arrays + 1 server job), up to 20 array tasks"


def test_frames_per_batch_and_solve_windows(tmp_path: Path, movie: dict[str, Path]) -> None:
    sweep = _slurm(tmp_path, movie, "fpb", executor=", frames_per_batch: 3",
                   grid="grid:\n  tracking.window_size: [4]\n")
    # segment ceil(10/3) = 4 batches: 0, then 1-3; link ceil(9/3) = 3: 0-2; solve ceil(9/4) = 3
    # windows: even 0,2 then odd 1, two arrays
    w = _count(sweep, limit=1001)
    assert (w.arrays, w.tasks, w.batches) == (5, 10, 10) and not w.up_to
    assert w.lines() == ["slurm: 6 sbatch calls (5 arrays + 1 server job), 10 array tasks"]


def test_measured_stages_run_several_frames_per_task(tmp_path: Path, movie: dict[str, Path]) -> None:
    """SlurmExecutor._per_task's rule: enough frames that the start-up stays under a tenth, but no
    more than frames // slots so that the tasks still fill max_parallel (4) shared among the
    branches in flight."""
    sweep = _slurm(tmp_path, movie, "sized")
    measured = {Stage.SEGMENT: _cost(1.0, 5.0), Stage.LINK: _cost(1.0, 5.0)}
    w = _count(sweep, limit=1001, measured=measured)
    # segment 1-9: 9 // 4 = 2 per task -> 5 tasks; link 0-8 the same; batch 0 and solve alone
    assert (w.arrays, w.tasks, w.batches) == (4, 1 + 5 + 5 + 1, 20) and not w.up_to
    # two branches in flight: 2 slots each, 9 // 2 = 4 per task -> 3 tasks
    key = sweep.trials[0].key
    w = _count(sweep, limit=1001, measured=measured, going={(key, Stage.SEGMENT): 2})
    assert w.tasks == 1 + 3 + 5 + 1
    # MaxArraySize 3 splits the 5 tasks of 1-9 as the executor does: tasks 0-2 from batch 1, 0-1 from 7
    assert phase_arrays(list(range(1, 10)), 3, 2) == [(1, [0, 1, 2]), (7, [0, 1])]
    w = _count(sweep, limit=3, measured=measured)
    assert (w.arrays, w.tasks) == (1 + 2 + 2 + 1, 12)
    # a start-up cheap against a frame: one frame per task, as before
    w = _count(sweep, limit=1001, measured={Stage.SEGMENT: _cost(10.0, 0.5), Stage.LINK: _cost(10.0, 0.5)})
    assert w.tasks == 20
    # the plan's line per trial says so too
    per_task = forecast.TaskSizer(sweep, measured).of(key, {})
    pt = plan_for(sweep, None).trials[0]
    import gridsearch.slurm.describe as describe

    limit = describe.max_array_size
    describe.max_array_size = lambda: 1001  # type: ignore[assignment]
    try:
        assert describe_jobs(sweep, pt, per_task) == [
            "segment: array 0 %4, then array 0-4 %4 x2", "link: array 0-4 %4 x2", "solve: array 0 %4"]
    finally:
        describe.max_array_size = limit  # type: ignore[assignment]


def test_databases_are_the_roots_and_forks_of_the_branch_plan(tmp_path: Path, movie: dict[str, Path]) -> None:
    sweep = load(write_spec(tmp_path, movie, name="dbs", grid=EXAMPLE_GRID, extra="parallel: 3\n"))
    order = [pt.trial for pt in plan_for(sweep, None).pending]
    sim = simulate(order, 3)
    dbs = forecast.databases(sim, [])
    roots = len({t.fingerprints[Stage.SEGMENT] for t in order})
    assert (dbs.in_all, dbs.forks) == (roots + sim.forks, sim.forks) and sim.forks > 0
    assert dbs.new == dbs.in_all - 1 and dbs.at_once == 3  # main, and at most `parallel`
    going = forecast.flights(sim)
    assert len(going) == 18 and max(going.values()) == 3 and min(going.values()) >= 1
    serial = simulate(order, 1)
    assert forecast.databases(serial, []) == forecast.Databases(1, 0, 0, 1)
    assert set(forecast.flights(serial).values()) == {1}


def test_a_resumed_plan_goes_on_from_what_each_database_holds(tmp_path: Path, movie: dict[str, Path]) -> None:
    """As the engine's Forest.start: a segment result main or a fork holds is not run again, its
    children queue there, and new databases take names no existing one has."""
    sweep = load(write_spec(tmp_path, movie, name="held", grid=EXAMPLE_GRID, extra="parallel: 3\n"))
    order = [pt.trial for pt in plan_for(sweep, None).pending]
    a, b = order[0], order[-1]  # the two segment configs
    assert a.fingerprints[Stage.SEGMENT] != b.fingerprints[Stage.SEGMENT]
    held = {"main": {Stage.SEGMENT: a.fingerprints[Stage.SEGMENT], Stage.LINK: None, Stage.SOLVE: None},
            "f1": {Stage.SEGMENT: b.fingerprints[Stage.SEGMENT], Stage.LINK: None, Stage.SOLVE: None}}
    sim = simulate(order, 3, held=held)
    assert not [r for r in sim.runs if r.node.stage == Stage.SEGMENT]
    assert len(sim.runs) == 4 + 12  # the links and solves
    def first_link(t: Trial) -> str:
        under = [r for r in sim.runs if r.node.stage == Stage.LINK
                 and r.node.owner.fingerprints[Stage.SEGMENT] == t.fingerprints[Stage.SEGMENT]]
        return min(under, key=lambda r: r.start).db

    assert (first_link(a), first_link(b)) == ("main", "f1")
    # no root is left to start on an empty database: every new one is a fork, named past f1
    dbs = forecast.databases(sim, held)
    assert dbs.new == dbs.forks == len({r.db for r in sim.runs} - {"main", "f1"}) > 0


# ---- plan on screen and in JSON ---------------------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """scontrol answering MaxArraySize 5 on PATH, sinfo and squeue that must not be called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize            = 5'\n")
    for name in ("sinfo", "squeue", "sbatch"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho called >> {tmp_path / name}.called\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    gateway.max_array_size.cache_clear()
    yield tmp_path
    gateway.max_array_size.cache_clear()


def test_plan_of_a_slurm_sweep_counts_jobs_and_tasks_at_80_columns(
    tmp_path: Path, movie: dict[str, Path], fake_slurm: Path
) -> None:
    spec = write_spec(tmp_path, movie, name="slplan", grid=EXAMPLE_GRID, extra=SLURM % "")
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # 2 segment runs (3 arrays, 10 tasks each at MaxArraySize 5), 4 link (2, 9), 12 solve (1, 1)
    assert doc["work"] == {"executor": "slurm", "stage_runs": 18, "batches": 68, "sbatch": 27, "arrays": 26,
                           "server_job": 1, "server_job_reused": None, "tasks": 68, "tasks_up_to": True}
    tree = doc["branches"]["tree"]
    roots = [n for n in tree if n["depth"] == 0]
    used = {n["database"] for n in tree}
    assert doc["databases"]["in_all"] == len(roots) + doc["branches"]["forks"] == len(used)
    assert doc["databases"]["at_once"] == 4  # a managed server on SLURM: parallel 4 by default
    assert doc["disk"]["database_bytes"] is None and doc["disk"]["workdir_bytes"] is None
    assert doc["estimate"] is None
    assert doc["trials"][0]["jobs"][0] == "segment: array 0 %4, then array 1-4 %4 + array 5-9 %4"

    r = CliRunner().invoke(main, ["plan", str(spec)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    block = lines[lines.index("before submitting:"):]
    assert block[1:3] == ["  slurm: 27 sbatch calls (26 arrays + 1 server job), up to 68 array tasks",
                          "    (fewer once a stage has 3 measured batches: a task then runs several frames)"]
    assert f"  databases: {doc['databases']['in_all']} in all, {doc['databases']['new']} new (" in r.stdout
    assert "  disk: a database's size is known after the first segment run; no workdir yet" in block
    assert any(ln.startswith("  time left: known once every stage it needs has 3 measured") for ln in block)
    assert not list(fake_slurm.glob("*.called"))  # nothing measured: sinfo not asked, nothing submitted
    assert not load(spec).workdir.exists()


def test_plan_does_not_count_a_server_job_the_sweep_would_reuse(
    tmp_path: Path, movie: dict[str, Path], fake_slurm: Path
) -> None:
    """A killed driver's server job still runs: the next sweep re-uses it (its password is in the
    workdir's pgpass file), so plan counts no sbatch for it; without the password it would be
    replaced, and plan counts one again."""
    spec = write_spec(tmp_path, movie, name="slplan", grid=EXAMPLE_GRID, extra=SLURM % "")
    ws = Workspace(load(spec).workdir)
    ws.root.mkdir(parents=True)
    (ws.root / READY).write_text("4242 node7:55432\n")
    (fake_slurm / "bin" / "squeue").write_text("#!/bin/sh\necho RUNNING\n")
    write_pgpass(ws.pgpass, "from-the-killed-driver")
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    work = json.loads(r.stdout)["work"]
    assert (work["sbatch"], work["arrays"]) == (26, 26)
    assert (work["server_job"], work["server_job_reused"]) == (0, "4242")
    r = CliRunner().invoke(main, ["plan", str(spec)], env={"COLUMNS": "80"})
    lines = r.stdout.splitlines()
    block = lines[lines.index("before submitting:"):]
    assert block[1:3] == ["  slurm: 26 sbatch calls (26 arrays), up to 68 array tasks",
                          "    (server job 4242 runs: re-used, no sbatch for it)"], r.stdout
    ws.pgpass.unlink()
    work = json.loads(CliRunner().invoke(main, ["plan", "--json", str(spec)]).stdout)["work"]
    assert (work["sbatch"], work["server_job"], work["server_job_reused"]) == (27, 1, None)


def _walk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


GRID3 = "grid:\n  segmentation.min_area: [30, 45, 60]\n  linking.max_distance: [15.0]\n" \
        "  tracking.appear_weight: [-0.1]\n"
MORE = "grid:\n  segmentation.min_area: [30, 45, 60]\n  linking.max_distance: [15.0, 6.0]\n" \
       "  tracking.appear_weight: [-0.1, -0.5]\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, movie: dict[str, Path]) -> Path:
    """Three trials on SQLite, every stage measured three times: the sweep file."""
    d = tmp_path_factory.mktemp("forecast")
    spec = write_spec(d, movie, name="fc", grid=GRID3)
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (3, 0)
    return spec


def test_plan_of_a_finished_sweep_measures_its_disk(finished: Path) -> None:
    r = CliRunner().invoke(main, ["plan", "--json", str(finished)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    workdir = load(finished).workdir
    main_db = _walk(workdir / "db" / "main")
    assert doc["work"] == {"executor": "local", "stage_runs": 0, "batches": 0}
    assert doc["databases"] == {"in_all": 0, "new": 0, "forks": 0, "at_once": 0}
    disk = doc["disk"]
    assert disk["measured"] == {"main": main_db} and main_db > 0
    assert disk["workdir_bytes"] == _walk(workdir) == disk["peak_bytes"]
    sizes = [_walk(workdir / "trials" / k) for k in os.listdir(workdir / "trials")]
    assert disk["export_bytes_per_trial"] == round(statistics.mean(sizes))
    r = CliRunner().invoke(main, ["plan", str(finished)], env={"COLUMNS": "80"})
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    block = lines[lines.index("what the rest of the plan runs:"):]
    now = forecast.size(_walk(workdir))
    assert block[1:4] == ["  local: 0 stage runs in 0 batches (one per stage run: SQLite), no jobs",
                          "  databases: none needed, nothing is left to run",
                          f"  disk: the workdir holds {now} now, nothing more to come"]
    assert not any("estimated remaining" in ln for ln in block)  # an estimate of nothing is no news


def test_plan_of_a_half_finished_sweep_with_branches(finished: Path) -> None:
    """The grid grows to 12 trials (9 to run), now with parallel: 2: the databases it makes come
    from the branch plan on what main holds; the disk from main's measured size."""
    spec = finished.with_name("fc2.yaml")
    spec.write_text(finished.read_text().replace(GRID3, MORE) + "parallel: 2\n")
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    workdir = load(spec).workdir
    assert doc["work"] == {"executor": "local", "stage_runs": doc["total_stage_runs"],
                           "batches": doc["total_stage_runs"]}
    tree = doc["branches"]["tree"]
    used = {n["database"] for n in tree}
    dbs = doc["databases"]
    assert dbs["in_all"] == len(used) and dbs["new"] == len(used - {"main"}) and dbs["at_once"] == 2
    main_db, now = _walk(workdir / "db" / "main"), _walk(workdir)
    per_trial = round(statistics.mean(_walk(workdir / "trials" / k) for k in os.listdir(workdir / "trials")))
    disk = doc["disk"]
    measured = (disk["database_bytes"], disk["workdir_bytes"], disk["export_bytes_per_trial"])
    assert measured == (main_db, now, per_trial)
    assert disk["peak_bytes"] == 2 * main_db + (now - main_db) + 9 * per_trial
    assert doc["estimate"]["wall_s"] > 0  # every stage measured three times
    r = CliRunner().invoke(main, ["plan", str(spec)], env={"COLUMNS": "80"})
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    # main holds the last trial's segment and link: the runs on them say which they go on from
    assert "solve appear_weight=-0.5 on min_area=60 max_distance=15.0  (main, step 1)" in lines
    block = lines[lines.index("what the rest of the plan runs:"):]
    n = doc["total_stage_runs"]
    assert block[1] == f"  local: {n} stage runs in {n} batches (one per stage run: SQLite), no jobs"
    assert f"  databases: {len(used)} in all, {len(used) - 1} new (" in r.stdout
    size = forecast.size
    assert f"  disk: 2 database(s) at once x {size(main_db)} (the largest now) = {size(2 * main_db)}" in block
    assert f"  disk: the workdir holds {size(now)} now, {size(main_db)} of it databases" in block
    peak, exports = size(disk["peak_bytes"]), size(9 * per_trial)
    assert f"  disk: about {peak} at the peak, with {exports} of trial exports to come" in block
    assert any(ln.startswith("  estimated remaining: ") for ln in block)


# ---- PostgreSQL: pg_database_size, or the sweep's schema on an existing server ---------------------------
@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_plan_measures_a_managed_servers_databases(open_tmp: Path, movie: dict[str, Path]) -> None:
    extra = "database: {kind: postgresql, managed: true}\nexecutor: {kind: local, workers: 1}\n"
    spec = write_spec(open_tmp, movie, name="fcpg", grid=ONE, extra=extra)
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (1, 0)
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    disk = json.loads(r.stdout)["disk"]
    sweep = load(spec)
    server = managed_server(sweep, Workspace(sweep.workdir))
    server.start()
    try:  # the server's own listing, as `db status` shows it
        size = {d["name"]: d["size_bytes"] for d in server.list_databases()}[db_name(sweep, "main")]
    finally:
        server.stop()
    assert set(disk["measured"]) == {"main"} and abs(disk["measured"]["main"] - size) <= 0.05 * size
    # the server's data directory is in the workdir: the database is part of what it holds
    assert disk["databases_in_workdir_bytes"] == disk["measured"]["main"] < disk["workdir_bytes"]


@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_plan_measures_the_sweeps_schema_on_an_existing_server(open_tmp: Path, movie: dict[str, Path],
                                                                lab: Any) -> None:
    server, creds = lab
    spec = write_spec(open_tmp, movie, name="fcext", grid=ONE, extra=lab_database(server.port))
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (1, 0)
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    schema = (load(spec).workdir / "pg-schema").read_text().strip()
    nodes = lab_rows(creds, "SELECT pg_total_relation_size(%s::regclass)", (f"{schema}.nodes",))[0]
    assert doc["disk"]["measured"]["main"] > nodes > 0
    assert doc["disk"]["databases_in_workdir_bytes"] == 0  # the user's server keeps it elsewhere
    assert doc["branches"]["parallel"] == 1  # a schema cannot be forked
