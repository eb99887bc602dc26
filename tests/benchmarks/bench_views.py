"""`status`, `results`, `best` and `plan` on a finished sweep, each in fresh processes, against a bare
`python -c pass` in the same run. Target: each < 1.5 s (issue 11).

    python tests/benchmarks/bench_views.py [--runs 7] [--workdir DIR]

The sweep is the example (sweeps/example.yaml: its 10-frame movie with ground truth, the 2 x 2 x 3
grid), copied under the workdir and run once with `gridsearch sweep` (kept when the workdir already
holds it). Rounds interleave the commands, so that a busy machine slows them all alike; the figure of
each is its median. Bytecode is cached under the workdir (PYTHONPYCACHEPREFIX) and warmed by a first
round that is not counted, as an installed gridsearch has it. Last, for comparison: `status` without
the sweep's record (workdir/validated.json), when ultrack's models validate the sweep file again."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VIEWS = ["status", "results", "best", "plan"]
HEAVY = ("ultrack", "torch", "pandas", "zarr", "optuna")
TARGET_S = 1.5


def _command(name: str, spec: Path) -> list[str]:
    if name == "pass":
        return [sys.executable, "-c", "pass"]
    return [sys.executable, "-m", "gridsearch.cli", name, str(spec)]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one fresh process: on a shared machine the CPU time
    says what the command costs, the wall time what it also waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _heavy_imports(cmd: list[str], env: dict[str, str]) -> list[str]:
    r = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True,
                       check=True)
    names = {ln.rpartition("|")[2].strip().partition(".")[0] for ln in r.stderr.splitlines()
             if ln.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gs-bench-views-"))
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "sweeps" / "example.yaml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    if not (root / "sweeps" / "runs" / "example" / "state.db").exists():
        shutil.copytree(REPO / "sweeps", root / "sweeps", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("runs"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        print(f"example sweep: {time.perf_counter() - t0:.1f} s (kept in {root})")
    names = ["pass", *VIEWS]
    for name in names:  # warm-up: bytecode written, files in the page cache
        _run(_command(name, spec), env)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.runs):
        for name in names:
            wall, cpu = _run(_command(name, spec), env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    bare = statistics.median(walls["pass"])
    print(f"{a.runs} fresh processes each, median wall (min-max) and CPU; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  python -c pass      {bare:5.2f} s, CPU {statistics.median(cpus['pass']):.2f} s")
    for name in VIEWS:
        w = walls[name]
        med = statistics.median(w)
        heavy = _heavy_imports(_command(name, spec), env)
        print(f"  gridsearch {name:<8} {med:5.2f} s ({min(w):.2f}-{max(w):.2f}), CPU "
              f"{statistics.median(cpus[name]):.2f} s; {'<' if med < TARGET_S else 'NOT <'} {TARGET_S} s; "
              f"imports {', '.join(heavy) or 'none'} of {', '.join(HEAVY)}")
    record = root / "sweeps" / "runs" / "example" / "validated.json"
    aside = record.with_name("validated.json.aside")
    record.rename(aside)  # as before the record: the config validated by ultrack's models again
    try:
        runs = [_run(_command("status", spec), env) for _ in range(3)]
    finally:
        aside.rename(record)
    print(f"  without the sweep's record (ultrack imported to validate): status "
          f"{statistics.median(r[0] for r in runs):.2f} s, CPU {statistics.median(r[1] for r in runs):.2f} s")


if __name__ == "__main__":
    main()
