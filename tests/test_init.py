"""`gridsearch init` on real-looking configs: the written sweep file loads as `plan` loads it, its
grid sits around the config's values, its database and executor follow what the machine has, and
a password in the config's [data] address never reaches the file or the terminal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import toml
import yaml
from click.testing import CliRunner, Result

from gridsearch import scaffold
from gridsearch.cli import main
from gridsearch.scaffold import Machine, choose_backend, parse_address, probe_machine, suggest_grid

PASSWORD = "s3cret"
# An Ultrack-Cluster-style config of the 0.5-0.7 era: a live server's address with its password.
CLUSTER_CONFIG = f"""\
[data]
address = "alice:{PASSWORD}@db.example.org:5432/ultrack"
database = "postgresql"
n_workers = 1
working_dir = "."

[segmentation]
min_area = 30
max_area = 1000
max_noise = 0.4
n_workers = 1
threshold = 0.5
ws_hierarchy = "area"

[linking]
max_distance = 15.0
max_neighbors = 5
n_workers = 1

[tracking]
appear_weight = -1
disappear_weight = -1
division_weight = -1
link_function = "power"
method = 0
power = 4
solution_gap = 0.01
window_size = 5
overlap_size = 1
"""

SLURM = Machine(slurm_cpus=64, postgres=None, cores=4)
POSTGRES = Machine(slurm_cpus=None, postgres=Path("/usr/lib/postgresql/15/bin"), cores=4)
BARE = Machine(slurm_cpus=None, postgres=None, cores=8)


@pytest.fixture(autouse=True)
def no_real_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here asks the machine's scheduler anything: the probe is replaced by each test."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a test probed the real machine")

    monkeypatch.setattr(scaffold, "probe_machine", refuse)


def _on(monkeypatch: pytest.MonkeyPatch, machine: Machine) -> None:
    monkeypatch.setattr(scaffold, "probe_machine", lambda: machine)


def _init(*args: str) -> Result:
    return CliRunner().invoke(main, ["init", *args])


def _movie_args(movie: dict[str, Path]) -> list[str]:
    return ["--foreground", str(movie["foreground"]), "--contours", str(movie["contours"])]


def _plan(out: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    import gridsearch.slurm.describe

    monkeypatch.setattr(gridsearch.slurm.describe, "max_array_size", lambda: 1001)  # no scontrol
    return CliRunner().invoke(main, ["plan", str(out)])


def test_a_password_in_the_address_is_dropped_and_said_so(
    tmp_path: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _on(monkeypatch, SLURM)
    (tmp_path / "config.toml").write_text(CLUSTER_CONFIG)
    out = tmp_path / "sweeps" / "cluster.yaml"
    r = _init("--config", str(tmp_path / "config.toml"), *_movie_args(movie), "--ground-truth",
              str(movie["gt"]), "-o", str(out))
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert PASSWORD not in text and PASSWORD not in r.stdout and PASSWORD not in r.stderr
    assert "dropped the password" in r.stdout and "alice" in r.stdout
    doc = yaml.safe_load(text)
    assert doc["name"] == "cluster" and doc["data"]["ground_truth"] == str(movie["gt"])
    assert doc["database"] == {"kind": "postgresql", "managed": True}
    assert doc["executor"]["kind"] == "slurm" and "SLURM answers" in text
    assert "# database: {kind: postgresql, host: db.example.org, port: 5432, user: alice" in text
    assert "data" not in doc["config"] and "n_workers" not in doc["config"]["segmentation"]
    assert doc["config"]["tracking"]["window_size"] == 5  # the user's own values are the base
    assert doc["grid"] == {"segmentation.min_area": [15, 30, 60], "linking.max_distance": [7.5, 15.0, 30.0],
                           "tracking.appear_weight": [-10.0, -1.0, -0.1]}
    assert "27 trials" in r.stdout
    paths = (str(tmp_path), str(movie["gt"].parent))  # the fixtures' paths are as long as pytest makes them
    assert [line for line in text.splitlines() if len(line) > 110 and not any(p in line for p in paths)] == []
    p = _plan(out, monkeypatch)
    assert p.exit_code == 0, p.output
    assert "27 trials" in p.stdout and not (out.parent / "runs").exists()


def test_ultracks_default_config_on_a_machine_with_postgres(
    tmp_path: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ultrack.config.config import MainConfig

    _on(monkeypatch, POSTGRES)
    dumped = MainConfig().model_dump(by_alias=True, mode="json")
    config = tmp_path / "config.toml"
    config.write_text(toml.dumps({s: {k: v for k, v in sec.items() if v is not None}
                                  for s, sec in dumped.items()}))
    monkeypatch.chdir(tmp_path)  # -o left out: NAME.yaml here
    r = _init("--config", "config.toml", *_movie_args(movie), "--name", "defaults")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((tmp_path / "defaults.yaml").read_text())
    assert doc["grid"] == {"segmentation.min_area": [50, 100, 200], "linking.max_distance": [7.5, 15.0, 30.0],
                           "tracking.appear_weight": [-0.01, -0.001, -0.0001]}
    assert doc["database"] == {"kind": "postgresql", "managed": True}
    assert doc["executor"] == {"kind": "local", "workers": 3}
    assert "dropped" not in r.stdout
    assert _plan(tmp_path / "defaults.yaml", monkeypatch).exit_code == 0


def test_missing_sections_take_ultracks_defaults_and_labels_are_an_input(
    tmp_path: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _on(monkeypatch, BARE)
    config = tmp_path / "pipeline" / "config.toml"
    config.parent.mkdir()
    config.write_text("[segmentation]\nmin_area = 40\nmax_area = 70\n")
    labels = np.stack([tifffile.imread(f) for f in sorted(movie["gt"].glob("TRA/man_track*.tif"))])
    tifffile.imwrite(tmp_path / "cells.tif", labels)
    out = tmp_path / "mysweep.yaml"
    r = _init("--config", str(config), "--labels", str(tmp_path / "cells.tif"), "-o", str(out))
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(out.read_text())
    assert doc["data"] == {"labels": ["cells.tif"]}  # beside the sweep file: relative to it
    assert doc["config"] == {"segmentation": {"min_area": 40, "max_area": 70}}
    assert doc["grid"]["segmentation.min_area"] == [20, 40]  # x2 would pass max_area
    assert doc["grid"]["linking.max_distance"] == [7.5, 15.0, 30.0]  # ultrack's default 15
    assert doc["database"] == "sqlite" and doc["executor"] == "local"
    assert "no PostgreSQL" in out.read_text()
    p = _plan(out, monkeypatch)
    assert p.exit_code == 0, p.output
    assert not (tmp_path / "runs").exists()  # plan converts nothing


def test_machine_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    import gridsearch.postgres
    import gridsearch.slurm.gateway
    from gridsearch.postgres import PostgresError

    monkeypatch.undo()  # the real probe, with each of its questions answered here
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(scaffold.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(gridsearch.slurm.gateway, "cluster_cpus", lambda partition=None: 32)
    monkeypatch.setattr(gridsearch.postgres, "find_binaries", lambda: Path("/pg/bin"))
    assert probe_machine() == Machine(32, Path("/pg/bin"), 6)
    assert choose_backend(probe_machine()).executor == "slurm"

    monkeypatch.setattr(scaffold.shutil, "which", lambda name: None)  # no sinfo: not asked
    monkeypatch.setattr(gridsearch.slurm.gateway, "cluster_cpus", lambda partition=None: 1 / 0)
    assert probe_machine() == Machine(None, Path("/pg/bin"), 6)
    assert choose_backend(probe_machine()).executor == {"kind": "local", "workers": 5}

    def no_pg() -> Path:
        raise PostgresError("not found")

    monkeypatch.setattr(gridsearch.postgres, "find_binaries", no_pg)
    assert choose_backend(probe_machine()).database == "sqlite"
    two_cores = choose_backend(Machine(None, Path("/pg/bin"), 2))
    assert (two_cores.database, two_cores.executor) == ("sqlite", "local") and "2 cores" in two_cores.detected
    many = choose_backend(Machine(None, Path("/pg/bin"), 64))
    assert many.executor["workers"] == scaffold.MAX_LOCAL_WORKERS


def test_addresses_and_suggestions() -> None:
    a = parse_address(f"alice:{PASSWORD}@db.example.org:5432/ultrack?gssencmode=disable")
    assert (a.user, a.host, a.port, a.dbname) == ("alice", "db.example.org", 5432, "ultrack")
    assert a.had_password
    assert parse_address(f"alice@db/ultrack?password={PASSWORD}").had_password
    assert not parse_address("alice@db:5432/ultrack").had_password
    sections = {"segmentation": {"min_area": 0, "max_area": 1000}, "linking": {"max_distance": 6.0},
                "tracking": {"appear_weight": 0.0}}
    grid = {g.key: g.values for g in suggest_grid(sections)}
    assert grid == {"segmentation.min_area": [0, 25, 50], "linking.max_distance": [3.0, 6.0, 12.0],
                    "tracking.appear_weight": [0.0, -0.01, -0.1]}


@pytest.mark.parametrize("case, args, where", [
    ("both inputs", ["--labels", "x.tif"], "not both"),
    ("no contours", ["--contours", None], "--contours"),
    ("no config", ["--config", "nothere.toml"], "nothere.toml"),
    ("bad key", ["--config", "bad.toml"], "min_areaa"),
    ("bad toml", ["--config", "broken.toml"], "not valid TOML"),
    ("missing array", ["--foreground", "nothere.zarr"], "data.foreground"),
    ("bad name", ["--name", "my sweep"], "name"),
])
def test_bad_init_is_one_line_exit_2_nothing_written(
    tmp_path: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch, case: str,
    args: list[str | None], where: str
) -> None:
    _on(monkeypatch, BARE)
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text("[segmentation]\nmin_areaa = 3\n")
    Path("broken.toml").write_text("[segmentation\n")
    opts: dict[str, str | None] = {"--config": None, "--foreground": str(movie["foreground"]),
                                   "--contours": str(movie["contours"]), "-o": "out/sweep.yaml"}
    extra: list[str] = []
    for i in range(0, len(args), 2):
        key, value = args[i], args[i + 1]
        if key in opts and key != "--labels":
            opts[key] = value
        else:
            extra += [key, value]  # type: ignore[list-item]
    argv = [x for k, v in opts.items() if v is not None for x in (k, v)] + extra
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = _init(*argv)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: init") and where in lines[0], lines
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # not even the output's folder


def test_an_existing_sweep_file_is_kept_unless_forced(
    tmp_path: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _on(monkeypatch, BARE)
    out = tmp_path / "mine.yaml"
    out.write_text("# my own sweep\n")
    r = _init(*_movie_args(movie), "-o", str(out))
    assert r.exit_code == 2 and "--force" in r.stderr and out.read_text() == "# my own sweep\n"
    r = _init(*_movie_args(movie), "-o", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(out.read_text())["config"] == {}  # no --config: ultrack's defaults
