"""End to end on the embedded default (SQLite, in-process), with real ultrack on a small movie."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import comparable, write_spec

from gridsearch import results
from gridsearch.cli import main
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.spec import SpecError, load
from gridsearch.stages import Stage


@pytest.fixture(scope="module")
def reference(sqlite_reference: tuple[Path, pd.DataFrame]) -> tuple[Path, pd.DataFrame]:
    return sqlite_reference


def _done_runs(spec: Path) -> pd.DataFrame:
    with existing_ledger(load(spec)) as led:
        return pd.DataFrame(led.stage_runs())


def test_example_grid_completes_with_minimal_stage_runs(reference: tuple[Path, pd.DataFrame]) -> None:
    spec, df = reference
    assert len(df) == 12 and (df["state"] == "done").all()
    runs = _done_runs(spec)
    done = runs[runs.state == "done"]
    assert done.groupby("stage").size().to_dict() == {"segment": 2, "link": 4, "solve": 12}
    # the ledger's fingerprint per run is unique: no stage result was computed twice
    assert not done.duplicated(["stage", "fingerprint"]).any()
    # reuse shows as empty times; each trial has its tracks and its full config
    assert df["segment_s"].notna().sum() == 2 and df["link_s"].notna().sum() == 4
    assert df["solve_s"].notna().all()
    assert sorted(df["first_stage"].value_counts().to_dict().items()) == [
        ("link", 2), ("segment", 2), ("solve", 8)]
    for _, row in df.iterrows():
        tracks = pd.read_csv(row["tracks_csv"])
        assert len(tracks) == row["selected_nodes"] and tracks["track_id"].nunique() == row["tracks"]
        assert Path(row["config"]).is_file()
    # the parameters actually reached ultrack: different link distance, different tracks
    assert df.groupby("linking.max_distance")["tracks"].mean().nunique() == 2


def test_trial_config_is_the_trials_ultrack_config(reference: tuple[Path, pd.DataFrame]) -> None:
    from ultrack.config.config import load_config

    _, df = reference
    row = df.iloc[-1]
    cfg = load_config(row["config"])
    assert cfg.segmentation_config.min_area == row["segmentation.min_area"]
    assert cfg.linking_config.max_distance == row["linking.max_distance"]
    assert cfg.tracking_config.appear_weight == row["tracking.appear_weight"]
    assert cfg.segmentation_config.max_area == 1000 and cfg.tracking_config.solver_name == "CBC"


def test_second_run_recomputes_nothing_and_grid_growth_adds_trials(
    reference: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    spec, df = reference
    again = run_sweep(load(spec))
    assert (again.completed, again.skipped) == (0, 12)
    assert sum(again.stage_runs.values()) == 0
    grown = spec.read_text().replace("[-0.1, -0.5, -1.0]", "[-0.1, -0.5, -1.0, -2.0]")
    spec.write_text(grown)
    try:
        out = run_sweep(load(spec))
        # 4 new trials, all on (segment, link) prefixes already computed: solve only
        assert out.completed == 4
        assert out.stage_runs[Stage.SEGMENT] <= 1 and out.stage_runs[Stage.SOLVE] == 4
        with existing_ledger(load(spec)) as led:
            df2 = results.table(load(spec), led)
        assert len(df2) == 16
        old = df2[df2["tracking.appear_weight"] != -2.0]
        pd.testing.assert_frame_equal(
            comparable(old).drop(columns=["number"]), comparable(df).drop(columns=["number"]))
    finally:
        spec.write_text(grown.replace("[-0.1, -0.5, -1.0, -2.0]", "[-0.1, -0.5, -1.0]"))


def test_changed_base_config_is_refused_unless_restart(
    reference: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    spec, _ = reference
    changed = tmp_path / spec.name
    changed.write_text(spec.read_text().replace("max_area: 1000", "max_area: 900").replace(
        "workdir: runs/ref", f"workdir: {spec.parent / 'runs' / 'ref'}"))
    with pytest.raises(SpecError, match="--restart"):
        run_sweep(load(changed))
    r = CliRunner().invoke(main, ["sweep", "-q", str(changed)])
    assert r.exit_code == 2 and "--restart" in r.stderr and "Traceback" not in r.output


def test_without_a_terminal_the_driver_logs_one_timestamped_line_per_event(movie: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """A SLURM job's log, nohup: stdout is not a terminal. Even 40 columns wide, no line is wrapped
    ("(from" / "segment)"), none redrawn, none coloured; one line per event, each with its time."""
    import os
    import re

    grid = "grid:\n  segmentation.min_area: [30, 60]\n  tracking.appear_weight: [-0.1, -0.5]\n"
    spec = write_spec(tmp_path, movie, name="log", grid=grid)
    r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", str(spec)], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "40"}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\x1b" not in r.stdout
    lines = r.stdout.splitlines()
    stamped = [re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.+)", ln) for ln in lines]
    assert all(stamped), [ln for ln, m in zip(lines, stamped, strict=True) if not m]
    events = [m.group(1) for m in stamped if m]
    assert all(e.count("(") == e.count(")") for e in events)  # no phrase broken across lines
    starts = [e for e in events if re.match(r"trial \d/4 ", e)]
    assert len(starts) == 4 and all(re.search(r" \(from (segment|link|solve)\)$", e) for e in starts)
    # the plan, per trial: started and finished, per stage run (2 + 2 + 4): started and done, the summary
    assert len(events) == 1 + 2 * 4 + 2 * 8 + 1, events
    assert events[0].startswith("4 trials (0 already done)")
    assert sum(" done in " in e for e in events) == 8
    assert events[-1].startswith("4 completed, 0 failed")


def test_a_terminal_keeps_the_live_display() -> None:
    import io

    from rich.console import Console

    from gridsearch.progress import LogReporter, RichReporter, for_console

    assert isinstance(for_console(Console(file=io.StringIO(), force_terminal=True)), RichReporter)
    assert isinstance(for_console(Console(file=io.StringIO())), LogReporter)


def test_the_live_display_leaves_ultracks_own_output_to_the_log(tmp_path: Path) -> None:
    """ultrack prints ("Solving ILP ...") and draws tqdm bars through sys.stdout and sys.stderr;
    the stage's fd redirect sends them to its log. The live display must not catch them first
    (rich's Progress redirects both by default), or a terminal fills with ultrack's lines."""
    import io

    from rich.console import Console

    from gridsearch.progress import RichReporter
    from gridsearch.runtime import fd_redirect

    screen = io.StringIO()
    shown = RichReporter(Console(file=screen, force_terminal=True, width=80))
    shown.progress.start()
    try:
        with fd_redirect(tmp_path / "ultrack.log"):
            print("Solving ILP ...")
            print("Exporting segmentation masks: 100%", file=sys.stderr)
    finally:
        shown.progress.stop()
    assert "Solving ILP" not in screen.getvalue()
    assert "Exporting segmentation masks" not in screen.getvalue()


def test_second_driver_is_refused_by_the_lock(movie: dict[str, Path], tmp_path: Path) -> None:
    spec = write_spec(tmp_path, movie, name="locked")
    from gridsearch.workspace import Workspace

    ws = Workspace(load(spec).workdir)
    with ws.lock():
        r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                           capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "another sweep is running" in r.stderr


def test_restart_archives_earlier_results_and_starts_over(movie: dict[str, Path], tmp_path: Path) -> None:
    grid = "grid:\n  tracking.appear_weight: [-0.1, -0.5]\n"
    spec = write_spec(tmp_path, movie, name="rs", grid=grid)
    assert run_sweep(load(spec)).completed == 2
    old_tracks = sorted(p.read_bytes() for p in (load(spec).workdir / "trials").rglob("tracks.csv"))
    spec.write_text(spec.read_text().replace("max_area: 1000", "max_area: 900"))
    r = CliRunner().invoke(main, ["sweep", "-q", str(spec)])
    assert r.exit_code == 2 and "--restart" in r.stderr
    r = CliRunner().invoke(main, ["sweep", "-q", "--restart", str(spec)])
    assert r.exit_code == 0, r.output
    archives = list((load(spec).workdir / "archive").iterdir())
    assert len(archives) == 1 and (archives[0] / "state.db").is_file()
    kept = sorted(p.read_bytes() for p in (archives[0] / "trials").rglob("tracks.csv"))
    assert kept == old_tracks  # nothing computed was lost
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
        assert len(led.study.get_trials()) == 2  # a fresh study, not the archived one
    assert set(df.state) == {"done"}
    assert all(Path(c).read_text().count("max_area = 900") == 1 for c in df.config)


def test_disk_full_mid_sweep_is_one_line_and_resumable(movie: dict[str, Path], small_disk) -> None:  # type: ignore[no-untyped-def]
    """A real full disk in the middle of a sweep: the workdir on a tmpfs that fills up."""
    mnt = small_disk("240k")
    grid = "grid:\n  segmentation.min_area: [30, 60]\n  tracking.appear_weight: [-0.1, -0.5]\n"
    spec = write_spec(mnt, movie, name="full", grid=grid)
    cli = [sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device"), r.stderr
    assert "Traceback" not in r.stderr
    # room again (a bigger disk): the same command finishes the sweep from its ledger
    subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
    assert set(df.state) == {"done"} and len(df) == 4


def test_label_images_dropped_on_request_but_scores_kept(movie: dict[str, Path], tmp_path: Path) -> None:
    base = (f"  ground_truth: {movie['gt']}\n"
            "config:\n  segmentation: {max_area: 1000}\n  tracking: {solver_name: CBC}\n")
    for keep in (True, False):
        spec = write_spec(tmp_path / str(keep), movie, name=f"k{keep}", base=base,
                          grid="grid:\n  linking.max_distance: [15.0]\n",
                          extra=f"keep_label_images: {str(keep).lower()}\n")
        assert run_sweep(load(spec)).completed == 1
        with existing_ledger(load(spec)) as led:
            row = results.table(load(spec), led).iloc[0]
        ctc = Path(row["tracks_csv"]).parent / "ctc"
        assert (ctc / "res_track.txt").is_file() and row["TRA"] > 0.9
        assert bool(list(ctc.glob("mask*.tif"))) is keep


def test_two_restarts_within_one_second_archive_apart(tmp_path: Path) -> None:
    """Archive names are stamped to the millisecond: a second `--restart` in the same second
    used to collide with the first one's archive."""
    from gridsearch.engine import archive
    from gridsearch.workspace import Workspace

    ws = Workspace(tmp_path / "w")
    made = []
    for run in range(2):
        ws.root.mkdir(parents=True, exist_ok=True)
        ws.state_db.write_text(f"ledger {run}")
        made.append(archive(ws))
        time.sleep(0.002)
    assert made[0] != made[1] and made[0] is not None and made[1] is not None
    assert [(d / "state.db").read_text() for d in made] == ["ledger 0", "ledger 1"]


def _records_via_optuna(led) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The read path before issue 10: every trial through optuna's get_trials."""
    led._records = {}
    for ft in led.study.get_trials(deepcopy=False):
        led._remember(ft)
    out, led._records = led._records, None
    return out


def test_results_read_from_the_tables_equal_optunas_read(reference: tuple[Path, pd.DataFrame]) -> None:
    """The fast read (one query per table) gives the same records and the same table."""
    from gridsearch import results
    from gridsearch.engine import existing_ledger
    from gridsearch.spec import load

    spec, _ = reference
    sw = load(spec)
    with existing_ledger(sw) as led:
        assert led is not None
        fast = results.table(sw, led)
        assert led.records() == _records_via_optuna(led)
        led._records = _records_via_optuna(led)
        slow = results.table(sw, led)
    pd.testing.assert_frame_equal(fast, slow)
    assert (fast["state"] == "done").sum() == 12


def test_records_of_failed_running_and_unscored_trials(tmp_path: Path) -> None:
    """States and values the example sweep never produces: FAIL, RUNNING, a NaN objective (-inf)."""
    from gridsearch.ledger import Ledger
    from gridsearch.spec import Trial
    from gridsearch.stages import Stage, fingerprints

    grid = {"tracking.appear_weight": [-0.1, -0.2, -0.3, -0.4]}
    led = Ledger(f"sqlite:///{tmp_path / 'state.db'}", "t")
    try:
        trials = []
        for n, v in enumerate(grid["tracking.appear_weight"]):
            sections = {"segmentation": {}, "linking": {}, "tracking": {"appear_weight": v}}
            trials.append(Trial(n, {"tracking.appear_weight": v}, sections, fingerprints(sections, "d")))
        numbers = [led.start_trial(t, Stage.SEGMENT, grid) for t in trials]
        led.finish_trial(numbers[0], 0.5, {"figures": {"tracks": 3}, "solver": "CBC"})
        led.finish_trial(numbers[1], float("nan"), {"figures": {}})
        led.fail_trial(numbers[2], "boom")
        led._records = None
        fast = led.records()
        assert fast == _records_via_optuna(led)
        assert [fast[t.key].state for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
        assert fast[trials[1].key].value == float("-inf") and fast[trials[2].key].value is None
    finally:
        led.close()
