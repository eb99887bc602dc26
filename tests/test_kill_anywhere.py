"""Issue 9: the driver SIGKILLed at 20+ random instants of ONE sweep, on SQLite (in-process) and on a
managed PostgreSQL with a worker pool. Every resume ends with the uninterrupted sweep's table, and no
finished stage or trial is computed twice.

How the instants are drawn. An uninterrupted run of the same sweep, traced (GRIDSEARCH_TRACE: the
driver appends one line per phase it enters), gives the timeline. A seeded RNG (the seed is printed;
GRIDSEARCH_KILL_SEED replays a chain, GRIDSEARCH_KILLS sets its length) draws a few kills inside
start-up and the rest at phase instances spread over the whole sweep, each at a random offset into
the instance. A resumed driver starts over at its own pace, so it is killed once its trace reaches
that phase instance, after that offset. At least one kill aims at each of clear, batches, export and
metrics; one that misses its phase is aimed again at the next such phase.

Where a kill landed is the last phase the killed driver traced (a line is in the file before its
phase starts, and a dead process writes nothing more). The kill is `kill -9` of the driver, then of
every other process of its group; pool workers must die with their driver on their own (Linux's
parent-death signal), since a worker that wrote on would corrupt what the next driver clears.
The chain's figures are printed (pytest -s shows them)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import sqlalchemy as sa
from helpers import comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.core.trace import TRACE_ENV
from gridsearch.engine import existing_ledger
from gridsearch.spec import load
from gridsearch.workspace import Workspace

KILLS = int(os.environ.get("GRIDSEARCH_KILLS", "20"))
STARTUP_SHARE = 0.15  # kills drawn inside start-up, before the driver did anything: a minority
REQUIRED = ("clear", "batches", "export", "metrics")  # each aimed at at least once
LIFE_TIMEOUT_S = 600.0
MAX_RETRIES = 6  # kills aimed again at a required phase that the first aim missed

# 2 segment x 2 link x 2 solve configs: 8 trials, 14 stage runs; ground truth, so metrics run too
GRID = """\
grid:
  segmentation.min_area: [30, 60]
  linking.max_distance: [6.0, 15.0]
  tracking.appear_weight: [-0.1, -1.0]
"""
PG = """
database: {kind: postgresql, managed: true}
executor: {kind: local, workers: 2}
"""

# trace phase -> where a kill there lands
CATEGORY = {
    "start": "startup",
    "trial": "between trials",  # the trial's ledger entry and config
    "clear": "clear",  # fingerprints erased, ultrack tables cleared, stage runs opened
    "stage": "batches",  # a stage's batches running (in the driver, or in pool workers)
    "export": "export",  # tracks.csv from the solution
    "metrics": "metrics",  # CTC export and scores
    "record": "record",  # the trial's figures and state written to the study
    "finished": "between trials",
    "end": "shutdown",  # workers and the managed server stopping
}


@dataclass(frozen=True)
class Event:
    t: float  # unix time
    pid: int
    phase: str
    key: str = ""
    stage: str = ""

    @property
    def ident(self) -> tuple[str, str, str]:
        return self.phase, self.key, self.stage

    @property
    def category(self) -> str:
        return CATEGORY[self.phase]

    def __str__(self) -> str:
        return " ".join(p for p in (self.phase, self.key, self.stage) if p)


class TraceReader:
    """The trace file, read on from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rest = path, 0, b""
        self.events: list[Event] = []  # everything read so far

    def last_of(self, pid: int) -> Event | None:
        self.read()
        return next((e for e in reversed(self.events) if e.pid == pid), None)

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        out = []
        for line in lines:
            t, pid, phase, *detail = line.decode().split()
            out.append(Event(float(t), int(pid), phase, *detail))
        self.events += out
        return out


@dataclass
class Timeline:
    """An uninterrupted run: start-up, then phase instances one after another."""

    startup: float  # seconds from spawn to the first trial
    instances: list[Event]
    starts: list[float]  # seconds from spawn
    durations: list[float]
    wall: float

    @classmethod
    def of(cls, events: list[Event], spawned: float, exited: float) -> Timeline:
        work = [e for e in events if e.phase != "start"]
        starts = [e.t - spawned for e in work]
        ends = [*starts[1:], exited - spawned]
        return cls(starts[0], work, starts, [b - a for a, b in zip(starts, ends, strict=True)],
                   exited - spawned)

    def index(self) -> dict[tuple[str, str, str], int]:
        return {e.ident: i for i, e in enumerate(self.instances)}

    def next_of(self, category: str, after: int) -> int | None:
        return next((i for i, e in enumerate(self.instances) if i > after and e.category == category), None)


@dataclass(frozen=True)
class Aim:
    """Kill once the trace reaches instance `index` of the reference, `offset` s into it; or, with
    index None, `offset` s after the driver was spawned (start-up)."""

    index: int | None
    offset: float
    why: str


def draw_plan(rng: random.Random, tl: Timeline, n: int) -> list[Aim]:
    """A few kills in start-up; the rest at a phase instance drawn uniformly over the sweep, at an
    offset drawn uniformly over its duration. (Uniform over time would put half of them into the
    first segment stage, whose numba compilation dominates the reference and is paid again by every
    driver that runs a segment: the dearest kills, and always the same fault.)"""
    n_startup = max(1, round(n * STARTUP_SHARE))
    progress = []
    # not the last trial's "finished" nor "end": what follows them is the exit, which a kill would race
    last = max(i for i, e in enumerate(tl.instances) if e.phase == "finished") - 1
    for _ in range(n - n_startup):
        i = rng.randrange(last + 1)
        progress.append(Aim(i, rng.uniform(0, tl.durations[i]), "uniform"))
    # at least one aim at each required phase, in the first 60 % of the sweep: a miss is aimed again
    replaceable = list(range(len(progress)))
    rng.shuffle(replaceable)
    for cat in REQUIRED:
        if any(tl.instances[a.index].category == cat for a in progress if a.index is not None):
            continue
        early = [i for i, e in enumerate(tl.instances) if e.category == cat and i < 0.6 * len(tl.instances)]
        i = rng.choice(early)
        progress[replaceable.pop()] = Aim(i, rng.uniform(0, tl.durations[i] / 2), f"aimed: {cat}")
    progress.sort(key=lambda a: (a.index, a.offset))
    plan = list(progress)
    for _ in range(n_startup):  # never after the last: a finished sweep exits before any start-up kill
        plan.insert(rng.randrange(len(plan)), Aim(None, rng.uniform(0, tl.startup), "startup"))
    return plan


@dataclass
class Kill:
    n: int
    aim: Aim
    at: float  # seconds after spawn
    last: Event | None  # the killed driver's last phase
    reference_index: int | None

    @property
    def landed(self) -> str:
        return "startup" if self.last is None else self.last.category


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "gridsearch.worker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def kill_9(proc: subprocess.Popen) -> tuple[list[psutil.Process], list[psutil.Process]]:  # type: ignore[type-arg]
    """SIGKILL the driver, then the rest of its process group (pg_ctl, initdb, helpers) but not its
    pool workers: those must die with their driver by themselves. Returns (workers, survivors)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    workers = [p for p in tree if _is_worker(p)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in tree:
        if p not in workers:
            with contextlib.suppress(psutil.Error):
                p.kill()
    _, alive = psutil.wait_procs(workers, timeout=20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the driver led its own group: nothing may be left in it
    return workers, alive


def spawn(spec: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def _exited(proc: subprocess.Popen, timeout: float) -> bool:  # type: ignore[type-arg]
    try:
        proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        return False
    return True


def wait_for_aim(proc: subprocess.Popen, trace: TraceReader, tl: Timeline, aim: Aim,  # type: ignore[type-arg]
                 spawned: float) -> bool:
    """Block until the aimed instant (False: the driver exited first). The offset is the random part
    of the instant, waited on the process itself so that an early exit is seen at once."""
    if aim.index is None:
        return not _exited(proc, spawned + aim.offset - time.time())
    index = tl.index()
    deadline = spawned + LIFE_TIMEOUT_S
    while time.time() < deadline:
        mine = [e for e in trace.read() if e.pid == proc.pid]
        for n, e in enumerate(mine):
            j = index.get(e.ident)
            if j is None or j < aim.index:
                continue
            if j > aim.index or n + 1 < len(mine):  # the driver went past it already: kill here
                return proc.poll() is None
            return _offset_into(proc, trace, e.t + aim.offset)
        if _exited(proc, 0.005):
            return False
    raise AssertionError(f"driver {proc.pid} never reached {tl.instances[aim.index]} in {LIFE_TIMEOUT_S} s")


def _offset_into(proc: subprocess.Popen, trace: TraceReader, at: float) -> bool:  # type: ignore[type-arg]
    """Wait until `at`, or until the driver leaves the aimed phase, whichever comes first: a resumed
    driver may pass a phase faster than the reference did (warm caches, nothing left to do), and
    near the end of the sweep it would otherwise exit before its kill."""
    while time.time() < at:
        if any(e.pid == proc.pid for e in trace.read()):
            break
        if _exited(proc, min(0.005, at - time.time())):
            return False
    return proc.poll() is None


# ------------------------------------------------------------------ reading the ledger


def _ledger_engine(spec: Path) -> sa.Engine | None:
    """A plain read-only connection to the ledger (no view: a view joins and stops the server)."""
    sw = load(spec)
    if sw.database.kind == "sqlite":
        ws = Workspace(sw.workdir)
        return sa.create_engine(f"sqlite:///{ws.state_db}") if ws.state_db.exists() else None
    from gridsearch.backends.postgres import db_name, managed_server

    server = managed_server(sw, Workspace(sw.workdir))
    if not server.is_running():
        return None
    url, kwargs = server.socket_url(db_name(sw, "state"))
    return sa.create_engine(url, **kwargs)


def finished_trials(spec: Path) -> tuple[set[str], int]:
    """(keys of trials the study holds COMPLETE, highest stage-run id) as a killed driver left them."""
    eng = _ledger_engine(spec)
    if eng is None:
        return set(), 0
    try:
        with eng.connect() as c:
            if not sa.inspect(c).has_table("gs_stage_run") or not sa.inspect(c).has_table("trials"):
                return set(), 0
            rows = c.execute(sa.text(
                "SELECT a.value_json FROM trials t JOIN trial_user_attributes a "
                "ON a.trial_id = t.trial_id AND a.key = 'key' WHERE t.state = 'COMPLETE'")).all()
            top = c.execute(sa.text("SELECT max(id) FROM gs_stage_run")).scalar() or 0
    finally:
        eng.dispose()
    return {r[0].strip('"') for r in rows}, int(top)


def rerun_violations(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Stage runs opened while their database still held that very result, done.

    The planner may legitimately run a fingerprint again: once a run of the same stage with another
    fingerprint was opened on that database (a sibling trial needed other parameters; opening it
    erased the result, whatever became of that run), the result is gone and a later trial that
    needs it recomputes it. What must never happen is a run opened for a result still held. Runs
    are opened in id order by one driver at a time; a done run finished before any later run opened."""
    by_db: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r["id"]):
        by_db.setdefault((r["database"], r["stage"]), []).append(r)
    bad = []
    for (db, stage), rows in by_db.items():
        held: str | None = None  # the fingerprint this stage holds done, per the rows so far
        for r in rows:
            if r["fingerprint"] == held:
                bad.append(f"{stage} run {r['id']} ({r['state']}) on {db}: {held[:12]} was held done")
            elif held is not None:
                held = None  # opening it erased the held result
            if r["state"] == "done":
                held = r["fingerprint"]
    return bad


def test_rerun_check_tells_a_recompute_from_a_legitimate_rerun() -> None:
    def run(i: int, fp: str, state: str = "done", stage: str = "segment") -> dict[str, Any]:
        return {"id": i, "database": "main", "stage": stage, "fingerprint": fp, "state": state}

    assert rerun_violations([run(1, "a", "interrupted"), run(2, "a"), run(3, "b", stage="link")]) == []
    # a sibling needed b: a is gone, a later trial recomputes it (even if b's run never started)
    assert rerun_violations([run(1, "a"), run(2, "b", "abandoned"), run(3, "a")]) == []
    assert rerun_violations([run(1, "a"), run(2, "b"), run(3, "a")]) == []
    # a still held: opening it again is a recompute, started or not
    assert len(rerun_violations([run(1, "a"), run(2, "a")])) == 1
    assert len(rerun_violations([run(1, "a"), run(2, "a", "abandoned")])) == 1
    # other stages and databases are other results
    assert rerun_violations([run(1, "a"), run(2, "a", stage="link"),
                             {**run(3, "a"), "database": "fork"}]) == []


# ------------------------------------------------------------------ the chain


@dataclass
class Chain:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    lives: int = 0  # driver runs, the final one included
    retries: int = 0
    workers_seen: list[psutil.Process] = field(default_factory=list)
    # trial key -> highest stage-run id when a kill found it finished; its tracks.csv then
    finished_at_run: dict[str, int] = field(default_factory=dict)
    tracks_mtime: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def distribution(self) -> Counter[str]:
        return Counter(k.landed for k in self.kills)


def run_reference(spec: Path, trace_path: Path, log: Path) -> Timeline:
    reader = TraceReader(trace_path)
    spawned = time.time()
    proc = spawn(spec, {TRACE_ENV: str(trace_path)}, log)
    assert proc.wait(timeout=LIFE_TIMEOUT_S) == 0, log.read_text()
    return Timeline.of(reader.read(), spawned, time.time())


def run_chain(spec: Path, tl: Timeline, plan: list[Aim], seed: int, trace_path: Path, log: Path) -> Chain:
    chain = Chain(seed)
    reader = TraceReader(trace_path)
    env = {TRACE_ENV: str(trace_path)}
    index = tl.index()
    queue = list(plan)
    position = -1  # reference index of the last landing
    t0 = time.time()
    while queue:
        aim = queue.pop(0)
        chain.lives += 1
        spawned = time.time()
        proc = spawn(spec, env, log)
        reached = wait_for_aim(proc, reader, tl, aim, spawned)
        assert reached, (f"seed {seed}: life {chain.lives} ended by itself (exit {proc.returncode}) before "
                         f"its kill: {log.read_text()[-2000:]}")
        workers, survivors = kill_9(proc)
        chain.workers_seen += workers
        last = reader.last_of(proc.pid)
        kill = Kill(len(chain.kills) + 1, aim, time.time() - spawned, last,
                    index.get(last.ident) if last else None)
        chain.kills.append(kill)
        if kill.reference_index is not None:
            position = kill.reference_index
        print(f"  kill {kill.n:2d} life {chain.lives:2d} [{aim.why}] at {kill.at:5.1f} s: "
              f"{kill.landed:14s} ({last or 'before start'})", flush=True)
        assert not survivors, (f"seed {seed}: pool workers outlived their SIGKILLed driver: "
                               f"{[p.pid for p in survivors]}")
        # a kill aimed at a required phase not hit yet that landed elsewhere: aim again, at the start
        # of the next such phase
        want = tl.instances[aim.index].category if aim.index is not None else "startup"
        if want in REQUIRED and want not in chain.distribution() and chain.retries < MAX_RETRIES:
            j = tl.next_of(want, position)
            if j is not None:
                chain.retries += 1
                queue.insert(0, Aim(j, 0.0, f"again: {want}"))
        keys, top = finished_trials(spec)
        for key in keys:
            chain.finished_at_run.setdefault(key, top)
            tracks = Workspace(load(spec).workdir).trial_dir(key) / "tracks.csv"
            chain.tracks_mtime.setdefault(key, tracks.stat().st_mtime_ns)
    # the last resume runs to the end
    chain.lives += 1
    proc = spawn(spec, env, log)
    assert proc.wait(timeout=LIFE_TIMEOUT_S) == 0, f"seed {seed}: the last resume failed: {log.read_text()}"
    chain.wall = time.time() - t0
    return chain


def _report(name: str, seed: int, tl: Timeline, chain: Chain, runs: pd.DataFrame) -> None:
    dist = chain.distribution()
    states = runs.state.value_counts().to_dict()
    print(f"\n[{name}] seed {seed} (GRIDSEARCH_KILL_SEED={seed} replays it): {len(chain.kills)} kills "
          f"({chain.retries} aimed again), {chain.lives} driver runs; reference sweep {tl.wall:.0f} s "
          f"(start-up {tl.startup:.1f} s), chain {chain.wall:.0f} s")
    print(f"[{name}] landed: " + ", ".join(f"{k} {v}" for k, v in dist.most_common()))
    print(f"[{name}] stage runs: {states}; trials found finished after a kill (never touched again): "
          f"{len(chain.finished_at_run)}; pool workers that died with their driver: "
          f"{len(chain.workers_seen)}")


def chain_test(directory: Path, movie: dict[str, Path], name: str, extra: str) -> None:
    seed = int(os.environ.get("GRIDSEARCH_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\n[{name}] kill seed {seed}")
    base = (f"  ground_truth: {movie['gt']}\n"
            "config:\n  segmentation: {max_area: 1000}\n  tracking: {solver_name: CBC}\n")
    ref_spec = write_spec(directory, movie, name=f"{name}ref", grid=GRID, base=base, extra=extra)
    spec = write_spec(directory, movie, name=name, grid=GRID, base=base, extra=extra)
    log = directory / f"{name}.stderr"

    tl = run_reference(ref_spec, directory / f"{name}ref.trace", log)
    with existing_ledger(load(ref_spec)) as led:
        assert led is not None
        ref = results.table(load(ref_spec), led)
        ref_runs = pd.DataFrame(led.stage_runs())
    minimal = ref_runs[ref_runs.state == "done"].groupby("stage").size().to_dict()
    assert minimal == {"segment": 2, "link": 4, "solve": 8}

    plan = draw_plan(random.Random(seed), tl, KILLS)
    chain = run_chain(spec, tl, plan, seed, directory / f"{name}.trace", log)
    sw = load(spec)
    why = f"seed {seed} (GRIDSEARCH_KILL_SEED={seed} replays it)"
    if sw.database.kind == "postgresql":  # the last resume stopped the server the killed ones left up
        from gridsearch.backends.postgres import managed_server

        assert not managed_server(sw, Workspace(sw.workdir)).is_running(), f"{why}: server left running"

    with existing_ledger(sw) as led:
        assert led is not None
        df = results.table(sw, led)
        runs = pd.DataFrame(led.stage_runs())
        attempts = led.study.get_trials(deepcopy=False)
    _report(name, seed, tl, chain, runs)

    assert len(chain.kills) >= KILLS, why
    dist = chain.distribution()
    assert dist["clear"] + dist["batches"] >= 1 and dist["export"] >= 1 and dist["metrics"] >= 1, (
        f"{why}: the kills missed a phase: {dict(dist)}")
    # every resume ended with the uninterrupted sweep's table
    pd.testing.assert_frame_equal(comparable(df), comparable(ref))
    # each trial ran as one study trial, never failed, never started twice
    assert sorted(str(t.state.name) for t in attempts) == ["COMPLETE"] * len(sw.trials), why
    assert len({t.user_attrs["key"] for t in attempts}) == len(sw.trials), why
    # no stage result computed twice: the minimal number of done runs, one per fingerprint, and no run
    # ever opened for a result the database held
    done = runs[runs.state == "done"]
    assert done.groupby("stage").size().to_dict() == minimal, f"{why}: {done.groupby('stage').size()}"
    assert not done.duplicated(["database", "stage", "fingerprint"]).any(), why
    assert rerun_violations(runs.to_dict("records")) == [], why
    # a kill inside a stage leaves that run interrupted, never trusted (at most one per kill there)
    assert (runs.state == "interrupted").sum() <= dist["batches"], why
    assert set(runs.state) <= {"done", "interrupted", "abandoned"}, why
    # a trial finished before a kill was never touched again: no stage run, same tracks.csv
    for key, top in chain.finished_at_run.items():
        later = runs[(runs.trial_key == key) & (runs.id > top)]
        assert later.empty, f"{why}: trial {key}, finished before a kill, ran again: {later.id.tolist()}"
        tracks = Workspace(sw.workdir).trial_dir(key) / "tracks.csv"
        assert tracks.stat().st_mtime_ns == chain.tracks_mtime[key], f"{why}: {key} re-exported"
    # nothing left behind: workers, the lock, a managed server
    assert not [p.pid for p in chain.workers_seen if p.is_running()], why
    assert Workspace(sw.workdir).holder() is None, why


def test_driver_killed_anywhere_on_sqlite(movie: dict[str, Path], tmp_path: Path) -> None:
    chain_test(tmp_path, movie, "kill", "")


@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_driver_killed_anywhere_on_postgres_with_workers(movie: dict[str, Path], open_tmp: Path) -> None:
    chain_test(open_tmp, movie, "pgkill", PG)

