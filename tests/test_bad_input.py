"""Bad sweep files: one line on stderr naming what, where and why; exit 2; nothing created."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from helpers import EXAMPLE_GRID, write_spec
from pydantic import ValidationError

from gridsearch.cli import main
from gridsearch.spec import StageResources
from gridsearch.validate import batch_problem

BASE = "config:\n  segmentation: {max_area: 1000}\n"
Edit = Callable[[Path, Path, dict[str, Path]], None]  # (tmp dir, spec file, movie) -> None


@dataclass(frozen=True)
class Bad:
    """A value that gets past the models today: `where` must appear in the one line."""

    where: str
    grid: str = EXAMPLE_GRID
    base: str = BASE
    extra: str = ""
    edit: Edit | None = None

    def write(self, tmp: Path, movie: dict[str, Path]) -> Path:
        spec = write_spec(tmp, movie, name="bad", grid=self.grid, extra=self.extra, base=self.base)
        if self.edit:
            self.edit(tmp, spec, movie)
        return spec


def _with_gt(change: Callable[[Path], None]) -> Edit:
    """A copy of the movie's ground truth, changed, named in the spec as data.ground_truth."""

    def edit(tmp: Path, spec: Path, movie: dict[str, Path]) -> None:
        gt = tmp / "gt"
        shutil.copytree(movie["gt"], gt)
        change(gt)
        text = spec.read_text()
        spec.write_text(text.replace("\nconfig:", f"\n  ground_truth: {gt}\nconfig:", 1))
    return edit


def _drop_last_frame(gt: Path) -> None:
    sorted(gt.glob("TRA/man_track*.tif"))[-1].unlink()


def _shrink_frames(gt: Path) -> None:
    for f in gt.glob("TRA/man_track*.tif"):
        tifffile.imwrite(f, tifffile.imread(f)[:64, :64])


def _workdir(make: Callable[[Path], Path]) -> Edit:
    """The spec's workdir replaced by make(tmp)."""

    def edit(tmp: Path, spec: Path, movie: dict[str, Path]) -> None:
        spec.write_text(spec.read_text().replace("workdir: runs/bad", f"workdir: {make(tmp)}"))
    return edit


def _under_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("")
    return tmp / "afile" / "runs" / "bad"


def _is_a_file(tmp: Path) -> Path:
    (tmp / "notadir").write_text("")
    return tmp / "notadir"


def _grid(*lines: str) -> str:
    return "grid:\n" + "".join(f"  {line}\n" for line in lines)


def _base(**sections: str) -> str:
    return "config:\n" + "".join(f"  {k}: {{{v}}}\n" for k, v in sections.items())


SLURM = "database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm, partition: p, stages: "
VALUES = {
    "nan in grid": Bad("threshold=nan", grid=_grid("segmentation.threshold: [0.5, .nan]")),
    "inf in base config": Bad("config.linking.max_distance", base=_base(linking="max_distance: .inf")),
    "-inf in grid": Bad("appear_weight", grid=_grid("tracking.appear_weight: [-0.1, -.inf]")),
    "nan weight guess": Bad("include_weight_guess", grid=_grid("tracking.include_weight_guess: [.nan]")),
    "negative window": Bad("window_size=-5", grid=_grid("tracking.window_size: [4, -5]")),
    "zero window": Bad("config.tracking.window_size", base=_base(tracking="window_size: 0")),
    "negative overlap": Bad("overlap_size=-1", grid=_grid("tracking.window_size: [4]",
                                                          "tracking.overlap_size: [1, -1]")),
    "overlap not below window": Bad("overlap_size=2", grid=_grid("tracking.window_size: [2, 3]",
                                                                 "tracking.overlap_size: [1, 2]")),
    "no neighbours": Bad("max_neighbors", grid=_grid("linking.max_neighbors: [5, 0]")),
    "zero max_distance": Bad("max_distance=0", grid=_grid("linking.max_distance: [6.0, 0]")),
    "negative min_area": Bad("min_area=-5", grid=_grid("segmentation.min_area: [30, -5]")),
    "zero max_area": Bad("max_area", base=_base(segmentation="min_area: 0, max_area: 0")),
    "zero min_area_factor": Bad("min_area_factor", grid=_grid("segmentation.min_area_factor: [4.0, 0]")),
    "zero time_limit": Bad("time_limit", base=_base(tracking="time_limit: 0")),
    "negative solution_gap": Bad("solution_gap", grid=_grid("tracking.solution_gap: [-0.1]")),
    "negative border": Bad("image_border_size", base=_base(tracking="image_border_size: [-1, 5]")),
    "n_threads below -1": Bad("n_threads", base=_base(tracking="n_threads: -2")),
    "ground truth short of frames": Bad("9 TRA/man_track", edit=_with_gt(_drop_last_frame)),
    "ground truth of another shape": Bad("(64, 64)", edit=_with_gt(_shrink_frames)),
    "SEG without SEG ground truth": Bad("SEG", extra="objective: SEG\n", edit=_with_gt(lambda gt: None)),
    "workdir under a file": Bad("workdir", edit=_workdir(_under_a_file)),
    "workdir is a file": Bad("workdir", edit=_workdir(_is_a_file)),
    "infinite poll": Bad("executor.poll_seconds", extra="executor: {kind: local, poll_seconds: .inf}\n"),
    "slurm mem": Bad("executor.stages.segment.mem", extra=SLURM + "{segment: {mem: 8 gigs}}}\n"),
    "slurm time": Bad("executor.stages.solve.time", extra=SLURM + "{solve: {time: 1 hour}}}\n"),
}


Data = tuple[dict[str, Path], str | None]  # (movie, data section lines or None)


def _group(tmp: Path, movie: dict[str, Path]) -> Path:
    """segments.zarr holding a foreground array only."""
    group = zarr.open_group(str(tmp / "segments.zarr"), mode="w")
    group.create_array("foreground", shape=(10, 8, 8), dtype="float32")
    return tmp / "segments.zarr"


def _file(name: str, content: bytes | np.ndarray) -> Callable[[Path, dict[str, Path]], Data]:
    """data.foreground: a file of that content (bytes, or an array written as a TIFF)."""

    def make(tmp: Path, movie: dict[str, Path]) -> Data:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            tifffile.imwrite(path, content)
        return {**movie, "foreground": path}, None
    return make


def _labels(*arrays: np.ndarray) -> Callable[[Path, dict[str, Path]], Data]:
    def make(tmp: Path, movie: dict[str, Path]) -> Data:
        paths = []
        for i, a in enumerate(arrays):
            paths.append(tmp / f"labels{i}.zarr")
            zarr.save_array(str(paths[-1]), a)
        return movie, f"data:\n  labels: [{', '.join(str(p) for p in paths)}]\n"
    return make


def _data(lines: str) -> Callable[[Path, dict[str, Path]], Data]:
    def make(tmp: Path, movie: dict[str, Path]) -> Data:
        return movie, "data:\n" + lines.format(**movie)
    return make


LABELS = np.zeros((10, 8, 8), dtype=np.uint16)
INPUTS: dict[str, Callable[[Path, dict[str, Path]], Data]] = {
    "group without the array": lambda tmp, m: ({**m, "contours": _group(tmp, m) / "contours"}, None),
    "a group, not an array": lambda tmp, m: ({**m, "foreground": _group(tmp, m)}, None),
    "neither zarr nor TIFF": _file("fg.png", b"\x89PNG\r\n\x1a\n"),
    "unreadable TIFF": _file("fg.tif", b"II*\x00garbage"),
    "TIFF of one image": _file("fg.tif", np.zeros((8, 8), dtype=np.float32)),
    "TIFF of 5 dimensions": _file("fg.tif", np.zeros((2, 2, 2, 4, 4), dtype=np.float32)),
    "labels and arrays": _data("  foreground: {foreground}\n  contours: {contours}\n"
                               "  labels: [{foreground}]\n"),
    "foreground alone": _data("  foreground: {foreground}\n"),
    "no data": _data("  ground_truth: {gt}\n"),
    "empty labels": _data("  labels: []\n"),
    "float labels": _labels(LABELS.astype(np.float32)),
    "labels of two shapes": _labels(LABELS, LABELS[:, :4]),
    "labels of one frame": _labels(LABELS[:1]),
}
INPUTS_WHERE = {
    "group without the array": "segments.zarr is a zarr group without an array contours "
                               "(it holds: foreground)",
    "a group, not an array": "is a zarr group, not an array",
    "neither zarr nor TIFF": "fg.png is neither a zarr array nor a TIFF stack",
    "unreadable TIFF": "fg.tif is not a readable TIFF: no image in it",
    "TIFF of one image": "data.foreground: expected T x (Z) x Y x X, got shape (8, 8)",
    "TIFF of 5 dimensions": "data.foreground: expected T x (Z) x Y x X",
    "labels and arrays": "not both",
    "foreground alone": "contours missing",
    "no data": "give foreground and contours",
    "empty labels": "empty list",
    "float labels": "data.labels[0]: dtype float32",
    "labels of two shapes": "data.labels[1]: shape (10, 4, 8)",
    "labels of one frame": "tracking needs at least 2",
}


def _case(tmp: Path, movie: dict[str, Path], case: str) -> Path:
    return VALUES[case].write(tmp, movie) if case in VALUES else _named_case(tmp, movie, case)


def _named_case(tmp: Path, movie: dict[str, Path], case: str) -> Path:
    grid, extra, base = EXAMPLE_GRID, "", "config:\n  segmentation: {max_area: 1000}\n"
    m, data = dict(movie), None
    if case == "unknown top-level key":
        extra = "colour: blue\n"
    elif case == "missing data":
        m["foreground"] = tmp / "nope.zarr"
    elif case == "unreadable array":
        bad = tmp / "bad.zarr"
        bad.mkdir()
        (bad / "zarr.json").write_text("{not json")
        m["contours"] = bad
    elif case == "shape mismatch":
        other = tmp / "small.zarr"
        zarr.save_array(str(other), np.zeros((3, 8, 8), dtype=np.float32))
        m["contours"] = other
    elif case in INPUTS:
        m, data = INPUTS[case](tmp, movie)
    elif case == "empty list":
        grid = "grid:\n  segmentation.min_area: []\n"
    elif case == "absurd grid":
        grid = "grid:\n" + "".join(
            f"  tracking.{k}: [{', '.join(str(i) for i in range(30))}]\n"
            for k in ("appear_weight", "disappear_weight", "division_weight", "power"))
    elif case == "unsweepable key":
        grid = "grid:\n  data.working_dir: [a, b]\n"
    elif case == "execution key":
        grid = "grid:\n  segmentation.n_workers: [1, 2]\n"
    elif case == "unknown ultrack key":
        grid = "grid:\n  segmentation.min_areaa: [1, 2]\n"
    elif case == "min_area above max_area":
        grid = "grid:\n  segmentation.min_area: [30, 2000]\n"
    elif case == "bad literal":
        grid = "grid:\n  tracking.solver_name: [CBC, CPLEX]\n"
    elif case == "bad type":
        grid = "grid:\n  linking.max_distance: [6.0, far]\n"
    elif case == "duplicate values":
        grid = "grid:\n  linking.max_distance: [6, 6.0]\n"
    elif case == "bad base config":
        base = "config:\n  segmentation: {max_areaa: 1000}\n"
    elif case == "missing base config file":
        base = "config: nothere.toml\n"
    elif case == "bad name":
        extra = ""
    elif case == "sqlite with workers":
        extra = "executor: {kind: local, workers: 3}\n"
    elif case == "objective without ground truth":
        extra = "objective: TRA\n"
    elif case == "unknown objective":
        extra = "objective: accuracy\n"
    elif case == "invalid yaml":
        pass
    spec = write_spec(tmp, m, name="bad", grid=grid, extra=extra, base=base, data=data)
    if case == "bad name":
        spec.write_text(spec.read_text().replace("name: bad", "name: my sweep!"))
    if case == "invalid yaml":
        spec.write_text(spec.read_text() + "grid: [unclosed\n")
    return spec


CASES = ["unknown top-level key", "missing data", "unreadable array", "shape mismatch", "empty list",
         "absurd grid", "unsweepable key", "execution key", "unknown ultrack key",
         "min_area above max_area", "bad literal", "bad type", "duplicate values", "bad base config",
         "missing base config file", "bad name", "sqlite with workers", "invalid yaml",
         "objective without ground truth", "unknown objective", *VALUES, *INPUTS]

WHERE = {"unknown top-level key": "colour", "missing data": "data.foreground",
         "unreadable array": "data.contours", "shape mismatch": "shape", "empty list": "min_area",
         "absurd grid": "810,000", "unsweepable key": "data.working_dir",
         "execution key": "n_workers", "unknown ultrack key": "min_areaa",
         "min_area above max_area": "min_area=2000", "bad literal": "solver_name",
         "bad type": "max_distance", "duplicate values": "duplicate", "bad base config": "max_areaa",
         "missing base config file": "nothere.toml", "bad name": "name",
         "sqlite with workers": "workers", "invalid yaml": "bad.yaml:",
         "objective without ground truth": "need data.ground_truth", "unknown objective": "accuracy",
         **{case: bad.where for case, bad in VALUES.items()}, **INPUTS_WHERE}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["sweep", "plan"])
def test_bad_input_one_line_exit_2_nothing_created(
    tmp_path: Path, movie: dict[str, Path], case: str, command: str
) -> None:
    spec = _case(tmp_path, movie, case)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, [command, str(spec)])
    assert r.exit_code == 2, (case, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "bad.yaml" in lines[0]
    assert WHERE[case] in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_missing_spec_file(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["sweep", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["16G", "16g", "8000", 8000, "512M", "1T", "100K", "0"])
def test_slurm_mem_formats_sbatch_takes(value: object) -> None:
    assert StageResources.model_validate({"mem": value}).mem == str(value)


@pytest.mark.parametrize("value", ["30", "30:00", "01:00:00", "2-0", "2-12:30", "2-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_sbatch_takes(value: str) -> None:
    assert StageResources.model_validate({"time": value}).time == value


@pytest.mark.parametrize("field, value", [
    ("mem", "8 gigs"), ("mem", "8GB"), ("mem", "-1G"), ("mem", "1.5G"), ("mem", ""),
    ("time", "1 hour"), ("time", "1:2:3:4"), ("time", "2-"), ("time", "-5"), ("time", 3600),
    ("time", "1h"),
])
def test_slurm_resources_sbatch_would_refuse(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=f"sbatch --{field}|quote it"):
        StageResources.model_validate({field: value})


def test_a_stage_without_batches_is_refused_whatever_the_cause() -> None:
    """The last guard behind the value rules: stage_phases itself, for each trial."""
    tracking = {"window_size": -5}
    assert batch_problem({"tracking": tracking}, 10, 1) == (
        "tracking: the solve stage would have no batch for 10 frames (frames_per_batch 1, window_size -5)")
    assert batch_problem({"tracking": {"window_size": 4}}, 10, 1) is None


@pytest.fixture
def read_only(small_disk: Callable[[str], Path]) -> Callable[[Callable[[Path], None]], Path]:
    """fill(dir) runs on a fresh tmpfs that is then remounted read-only: unwritable even for root,
    which passes every permission check a chmod 0555 would make."""

    def make(fill: Callable[[Path], None]) -> Path:
        mnt = small_disk("1m")
        fill(mnt)
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {r.stderr.strip()}")
        return mnt
    return make


@pytest.mark.parametrize("command", ["sweep", "plan"])
def test_workdir_on_a_read_only_filesystem_cannot_be_created(
    tmp_path: Path, movie: dict[str, Path], read_only: Callable[[Callable[[Path], None]], Path],
    command: str,
) -> None:
    mnt = read_only(lambda d: (d / "sweeps").mkdir())
    spec = Bad("", edit=_workdir(lambda _: mnt / "sweeps" / "bad")).write(tmp_path, movie)
    r = CliRunner().invoke(main, [command, str(spec)])
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.strip().splitlines() == [
        f"error: {spec}: workdir: cannot create {mnt}/sweeps/bad: {mnt}/sweeps is not writable"]
    assert not (tmp_path / "runs").exists()


def test_existing_read_only_workdir_refuses_a_sweep_but_not_a_view(
    tmp_path: Path, movie: dict[str, Path], read_only: Callable[[Callable[[Path], None]], Path],
) -> None:
    mnt = read_only(lambda d: (d / "bad").mkdir())
    spec = Bad("", edit=_workdir(lambda _: mnt / "bad")).write(tmp_path, movie)
    r = CliRunner().invoke(main, ["sweep", str(spec)])
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.strip().splitlines() == [f"error: {spec}: workdir: {mnt}/bad is not writable"]
    assert list((mnt / "bad").iterdir()) == []
    r = CliRunner().invoke(main, ["plan", str(spec)])
    assert r.exit_code == 0, (r.output, r.exception)


def test_trial_cap_is_a_setting(tmp_path: Path, movie: dict[str, Path]) -> None:
    """Over the cap: one line naming the setting to raise; raised, the same grid plans."""
    grid = "grid:\n  linking.max_distance: [" + ", ".join(str(5 + i) for i in range(12)) + "]\n" + "".join(
        f"  tracking.{k}: [{', '.join(str(-i / 10) for i in range(1, 13))}]\n"
        for k in ("appear_weight", "disappear_weight", "division_weight"))
    spec = write_spec(tmp_path, movie, name="bad", grid=grid)  # 12^4 = 20,736 trials
    r = CliRunner().invoke(main, ["plan", str(spec)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "20,736" in lines[0] and "exceeds max_trials (10,000)" in lines[0], lines
    assert "raise max_trials in the sweep file" in lines[0]
    spec.write_text(spec.read_text() + "max_trials: 25000\n")
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert len(json.loads(r.stdout)["trials"]) == 20_736
    r = CliRunner().invoke(main, ["plan", str(spec)])  # on screen: a summary, not 20,736 rows
    assert r.exit_code == 0 and len(r.stdout.splitlines()) < 60, r.output
    assert "20,706 more trials" in r.stdout and "naive 62208" in r.stdout, r.stdout
    spec.write_text(spec.read_text().replace("max_trials: 25000", "max_trials: 0"))
    r = CliRunner().invoke(main, ["plan", str(spec)])
    assert r.exit_code == 2 and "max_trials" in r.stderr, r.output
