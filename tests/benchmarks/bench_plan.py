"""`plan` on a 100,000-point grid. Target: loading the sweep file and making the plan < 2 s and
< 500 MB, in-process (ultrack's config models imported beforehand: that import is paid once by
every command, and is reported apart). The whole `gridsearch plan` command in a fresh process is
reported for information.

    python tests/benchmarks/bench_plan.py [--values 10] [--one-section] [--workdir DIR]

The grid has 5 keys of --values values each (10: 100,000 trials): one segmentation, one linking
and three tracking keys; --one-section puts all five in tracking, the worst case (every trial a
section of its own to validate)."""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import yaml


def grid_for(n: int, one_section: bool) -> dict[str, list[float]]:
    keys = (["tracking.power", "tracking.bias"] if one_section
            else ["segmentation.min_area", "linking.max_distance"])
    keys += ["tracking.appear_weight", "tracking.disappear_weight", "tracking.division_weight"]
    grid: dict[str, list[float]] = {}
    for k in keys:
        start = {"segmentation.min_area": 10.0, "linking.max_distance": 5.0, "tracking.power": 1.0}.get(k)
        grid[k] = ([start + i for i in range(n)] if start is not None
                   else [round(-0.05 * (i + 1), 3) for i in range(n)])
    return grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, default=10)
    ap.add_argument("--one-section", action="store_true")
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gs-bench-plan-"))
    root.mkdir(parents=True, exist_ok=True)
    from gridsearch.synth import generate_movie

    movie = generate_movie(root / "movie")
    spec = root / "plan.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "bench_plan", "workdir": str(root / "sweep"), "max_trials": 10 ** 6,
        "data": {"foreground": str(movie["foreground"]), "contours": str(movie["contours"])},
        "config": {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC"}},
        "grid": grid_for(a.values, a.one_section)}))

    from gridsearch.engine import plan_for
    from gridsearch.spec import load

    t0 = time.perf_counter()
    import ultrack.config.config  # noqa: F401  (what every command pays once)

    print(f"import ultrack.config.config: {time.perf_counter() - t0:.2f} s (paid by every command)")
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    sw = load(spec)
    t1 = time.perf_counter()
    p = plan_for(sw, None)
    t2, cpu = time.perf_counter(), time.process_time() - c0
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    runs = p.stage_runs()
    per_stage = ", ".join(f"{s.label} {n:,}" for s, n in runs.items())
    print(f"grid: {len(sw.trials):,} trials; stage runs {per_stage}")
    print(f"load + make_plan: {t2 - t0:.2f} s (load {t1 - t0:.2f} s, plan {t2 - t1:.2f} s); "
          f"{cpu:.2f} s CPU; peak RSS +{rss:.0f} MB (target < 2 s, < 500 MB)")
    del sw, p
    gc.collect()
    tracemalloc.start()
    plan_for(load(spec), None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"load + make_plan, Python allocations at peak (tracemalloc): {peak / 2 ** 20:.0f} MB")
    for args in (["plan"], ["plan", "--json"]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "gridsearch.cli", *args, str(spec)], capture_output=True,
                           text=True)
        wall = time.perf_counter() - t0
        lines = len(r.stdout.splitlines())
        print(f"gridsearch {' '.join(args)} (process start to exit): {wall:.2f} s, exit {r.returncode}, "
              f"{lines:,} lines of output (information)")


if __name__ == "__main__":
    main()
