"""Branches at once on SLURM: the 2 x 2 x 3 grid on a 10-frame movie with dividing cells, the
PostgreSQL server as a job, run as the engine ran before issue 10 (parallel 1, one frame per task)
and with forked branches (parallel K) and right-sized tasks, one after the other in this run;
then the simulator's prediction of both from the first run's measured costs, and its prediction
for a 225-frame movie with a 3 x 3 x 4 grid.

    python tests/benchmarks/bench_slurm.py [--parallel 6] [--workdir DIR]   (needs the test cluster)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GRID = {
    "segmentation.min_area": [30, 60],
    "linking.max_distance": [6.0, 15.0],
    "tracking.appear_weight": [-0.1, -0.5, -1.0],
}
BASE = {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC"}}


def write(root: Path, movie: dict[str, Path], name: str, k: int, max_parallel: int,
          one_frame_tasks: bool = False) -> Path:
    """one_frame_tasks: frames_per_batch 1 (explicit: one frame per task, as before right-sizing)."""
    executor = {"kind": "slurm", "max_parallel": max_parallel, "poll_seconds": 1}
    if one_frame_tasks:
        executor["frames_per_batch"] = 1
    spec = root / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "workdir": str(root / name),
        "data": {"foreground": str(movie["foreground"]), "contours": str(movie["contours"])},
        "config": BASE, "grid": GRID, "parallel": k,
        "database": {"kind": "postgresql", "managed": True}, "executor": executor,
    }))
    return spec


def run(spec: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def predicted(measured_spec: Path, spec: Path) -> float | None:
    """The makespan the cost model predicts for `spec` (its parallel, its tasks) from the batches
    `measured_spec` measured, for the whole grid as if nothing were done yet."""
    from gridsearch import costs
    from gridsearch.engine import existing_ledger
    from gridsearch.planner import make_plan
    from gridsearch.spec import load

    with existing_ledger(load(measured_spec)) as led:
        assert led is not None
        measured = costs.stage_costs(led.measured_batches())
    sw = load(spec)
    est = costs.branch_estimate(make_plan(sw.trials, {}, set()), measured, costs.workload(sw), sw.parallel)
    return est.wall_s if est else None


def big_grid() -> None:
    """A real user's sweep: 225 frames, a 3 x 3 x 4 grid; stated costs: segment 30 s and link
    20 s per frame (3D), a solve of 45 min (one window), 5 s start-up per task; 32 CPUs per node."""
    import itertools

    from gridsearch import costs
    from gridsearch.planner import make_plan
    from gridsearch.spec import Trial
    from gridsearch.stages import Stage, fingerprints

    trials = []
    grid = itertools.product([30, 60, 90], [6.0, 10.0, 15.0], [-0.1, -0.3, -0.5, -1.0])
    for n, (a, d, w) in enumerate(grid):
        sections = {"segmentation": {"min_area": a}, "linking": {"max_distance": d},
                    "tracking": {"appear_weight": w}}
        params = {"segmentation.min_area": a, "linking.max_distance": d, "tracking.appear_weight": w}
        trials.append(Trial(n, params, sections, fingerprints(sections, "big")))
    plan = make_plan(trials, {}, set())
    stated = {Stage.SEGMENT: costs.StageCost(99, 30.0, 30.0, 5.0, 4000.0),
              Stage.LINK: costs.StageCost(99, 20.0, 20.0, 5.0, 4000.0),
              Stage.SOLVE: costs.StageCost(99, 2700.0 / 225, 2700.0 / 225, 5.0, 8000.0)}
    print("225 frames, 3 x 3 x 4 grid (stated costs: segment 30 s/frame, link 20 s/frame, solve 45 min, "
          "start-up 5 s; 32 CPUs per node):")
    for nodes in (1, 10, 100):
        work = costs.Workload(225, 1, nodes * 32, True, auto_tasks=True)
        one = costs.branch_estimate(plan, stated, work, 1)
        wide = costs.branch_estimate(plan, stated, work, 36)
        assert one is not None and wide is not None
        print(f"  {nodes:>3} node(s): serial {costs.duration(one.wall_s)}, parallel 36 "
              f"{costs.duration(wide.wall_s)} ({one.wall_s / wide.wall_s:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--max-parallel", type=int, default=2,
                    help="tasks at once per array (the test node advertises 16 CPUs on 2 cores)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--only-prediction", action="store_true", help="the 225-frame prediction alone")
    a = ap.parse_args()
    big_grid()
    if a.only_prediction:
        return
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gs-bslurm-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    from gridsearch.synth import generate_movie

    movie = generate_movie(root / "movie", n_frames=10, divisions=2, seed=3)
    # before this issue: one stage run at a time, one frame per task
    serial = write(root, movie, "bserial", 1, a.max_parallel, one_frame_tasks=True)
    wide = write(root, movie, "bwide", a.parallel, a.max_parallel)  # branches + right-sized tasks
    t1 = run(serial)
    print(f"serial, one frame per task (the engine before this issue): {t1:.0f} s", flush=True)
    p1, pk = predicted(serial, serial), predicted(serial, wide)
    tk = run(wide)
    print(f"parallel {a.parallel}, right-sized tasks: {tk:.0f} s; speed-up {t1 / tk:.2f}x", flush=True)
    if p1 is not None and pk is not None:
        print(f"simulator from the serial run's costs: serial {p1:.0f} s (measured {t1:.0f} s, "
              f"{100 * (p1 - t1) / t1:+.0f}%), parallel {a.parallel} {pk:.0f} s (measured {tk:.0f} s, "
              f"{100 * (pk - tk) / tk:+.0f}%)")
    else:
        print("simulator: not every stage was measured")
    _cpu(serial, wide)


def _cpu(*specs: Path) -> None:
    """What limits it here: CPU-seconds the batches and the tasks' start-ups used, against 2 cores."""
    from gridsearch.engine import existing_ledger
    from gridsearch.slurm.jobs import JobStore
    from gridsearch.slurm.parse import expand
    from gridsearch.spec import load

    for spec in specs:
        with existing_ledger(load(spec)) as led:
            assert led is not None
            rows = led.measured_batches()
            tasks = sum(len(expand(r.indices)) for r in JobStore(led.engine).rows())
        cpu = sum(r["cpu_s"] or 0.0 for r in rows)
        startups = [r["startup_s"] for r in rows if r.get("paid_startup") and r.get("startup_s")]
        print(f"  {spec.stem}: {tasks} tasks, {len(rows)} batches, batches' CPU {cpu:.0f} s, "
              f"median start-up {sorted(startups)[len(startups) // 2] if startups else 0:.1f} s a task")


if __name__ == "__main__":
    main()
