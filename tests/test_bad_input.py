"""Bad sweep files: one line on stderr naming what, where and why; exit 2; nothing created."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import EXAMPLE_GRID, write_spec

from gridsearch.cli import main


def _case(tmp: Path, movie: dict[str, Path], case: str) -> Path:
    grid, extra, base = EXAMPLE_GRID, "", "config:\n  segmentation: {max_area: 1000}\n"
    m = dict(movie)
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
    spec = write_spec(tmp, m, name="bad", grid=grid, extra=extra, base=base)
    if case == "bad name":
        spec.write_text(spec.read_text().replace("name: bad", "name: my sweep!"))
    if case == "invalid yaml":
        spec.write_text(spec.read_text() + "grid: [unclosed\n")
    return spec


CASES = ["unknown top-level key", "missing data", "unreadable array", "shape mismatch", "empty list",
         "absurd grid", "unsweepable key", "execution key", "unknown ultrack key",
         "min_area above max_area", "bad literal", "bad type", "duplicate values", "bad base config",
         "missing base config file", "bad name", "sqlite with workers", "invalid yaml",
         "objective without ground truth", "unknown objective"]

WHERE = {"unknown top-level key": "colour", "missing data": "data.foreground",
         "unreadable array": "data.contours", "shape mismatch": "shape", "empty list": "min_area",
         "absurd grid": "810,000", "unsweepable key": "data.working_dir",
         "execution key": "n_workers", "unknown ultrack key": "min_areaa",
         "min_area above max_area": "min_area=2000", "bad literal": "solver_name",
         "bad type": "max_distance", "duplicate values": "duplicate", "bad base config": "max_areaa",
         "missing base config file": "nothere.toml", "bad name": "name",
         "sqlite with workers": "workers", "invalid yaml": "bad.yaml:",
         "objective without ground truth": "need data.ground_truth", "unknown objective": "accuracy"}


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
