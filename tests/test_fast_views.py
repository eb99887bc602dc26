"""Views of a sweep that ran are quick: they take what its `sweep` validated from workdir/validated.json
while the config is the one validated and the inputs' metadata files are unchanged, so they never
import ultrack (nor torch, which it imports); a changed sweep file is validated by ultrack's models
again, with the same one line as `sweep`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_spec

from gridsearch.engine import run_sweep
from gridsearch.inputs import Headers
from gridsearch.spec import Sweep, load
from gridsearch.validate import SpecError
from gridsearch.validated import RECORD, write

VIEWS = ["status", "results", "best", "plan"]
# What would make a view slow: ultrack (4-6 s, it imports torch) above all; then what a sweep file's
# record and the ledger's SQL reads make unnecessary.
HEAVY = ["ultrack", "torch", "pandas", "zarr", "tifffile", "optuna", "matplotlib"]
# Coerced by ultrack's models (60.0 -> 60, 6 -> 6.0, a list -> a tuple): the record must keep their dumps.
RICH_GRID = """\
grid:
  segmentation.min_area: [30, 60.0]
  linking.max_distance: [6, 15.5]
  tracking.window_size: [null, 5]
  tracking.image_border_size: [[0, 2, 2]]
  tracking.link_function: [power, identity]
"""


def _base(movie: dict[str, Path]) -> str:
    return (f"  ground_truth: {movie['gt']}\n"
            "config:\n  segmentation: {max_area: 1000}\n  tracking: {solver_name: CBC}\n")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, movie: dict[str, Path]) -> Path:
    """A finished two-trial sweep with ground truth: its sweep file."""
    d = tmp_path_factory.mktemp("fast")
    spec = write_spec(d, movie, name="fast", base=_base(movie),
                      grid="grid:\n  tracking.appear_weight: [-0.1, -0.5]\n")
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (2, 0)
    return spec


def _imported(stderr: str) -> set[str]:
    """Top-level packages named by `python -X importtime`."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("import time:")]
    names = (ln.rpartition("|")[2].strip() for ln in lines)
    return {n.partition(".")[0] for n in names}


def _view(command: str, spec: Path) -> subprocess.CompletedProcess[str]:
    """A fresh process, without a terminal, 80 columns wide."""
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "gridsearch.cli", command, str(spec)],
                          capture_output=True, text=True, env=env, timeout=120)


def _same(a: Sweep, b: Sweep) -> None:
    assert a.base_sections == b.base_sections and a.data_identity == b.data_identity
    assert [(t.key, t.params, t.sections, t.fingerprints) for t in a.trials] == \
           [(t.key, t.params, t.sections, t.fingerprints) for t in b.trials]


def test_the_sweep_records_what_it_validated(ran: Path) -> None:
    full = load(ran)
    doc = json.loads((full.workdir / RECORD).read_text())
    assert set(doc) == {"format", "headers", "digest", "base", "values"}
    assert doc["values"] == {"tracking.appear_weight": [-0.1, -0.5]}
    assert {str(full.file.data.foreground), str(full.file.data.contours)} <= set(doc["headers"])


def test_a_trusted_load_is_the_full_load(tmp_path: Path, movie: dict[str, Path]) -> None:
    """Every section rebuilt from the record equals what ultrack's models make of it, so every
    trial key and fingerprint is the same: a view reads the same ledger rows as the sweep."""
    spec = write_spec(tmp_path, movie, name="rich", base=_base(movie), grid=RICH_GRID)
    full = load(spec)
    assert not full.validated.trusted and full.validated.complete()
    full.workdir.mkdir(parents=True)
    write(full.workdir, full.validated, full.headers.seen)
    trusted = load(spec, trust=True)
    assert trusted.validated.trusted
    _same(trusted, full)
    assert {t.sections["segmentation"]["min_area"] for t in trusted.trials} == {30, 60}
    assert trusted.trials[0].sections["tracking"]["image_border_size"] == [0, 2, 2]


def test_a_record_counts_only_for_its_own_config_and_unchanged_inputs(tmp_path: Path,
                                                                       movie: dict[str, Path]) -> None:
    import shutil

    data = tmp_path / "data"
    own = {k: data / movie[k].name for k in ("foreground", "contours")}
    for k, p in own.items():
        shutil.copytree(movie[k], p)
    spec = write_spec(tmp_path, {**own, "gt": movie["gt"]}, name="own",
                      grid="grid:\n  tracking.appear_weight: [-0.1]\n")
    full = load(spec)
    full.workdir.mkdir(parents=True)
    write(full.workdir, full.validated, full.headers.seen)
    # another config: validated again, by ultrack's models
    spec.write_text(spec.read_text().replace("[-0.1]", "[-0.1, -0.2]"))
    other = load(spec, trust=True)
    assert not other.validated.trusted and len(other.trials) == 2
    # re-created input: its metadata is read again, and the identity says so
    meta = own["foreground"] / "zarr.json"
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = load(spec, trust=True)
    assert again.data_identity != full.data_identity
    assert again.data_identity == load(spec).data_identity


def test_headers_are_taken_only_while_their_files_are_unchanged() -> None:
    reads: list[str] = []
    known = {"/a": {"stat": "zarr.json:1:2\n", "value": [10, 64, 64]}}
    h = Headers(known)
    assert h.get(Path("/a"), "zarr.json:1:2\n", lambda: reads.append("a") or [1]) == [10, 64, 64]
    assert h.get(Path("/a"), "zarr.json:1:3\n", lambda: reads.append("a") or [9, 64, 64]) == [9, 64, 64]
    assert reads == ["a"] and h.seen == {"/a": {"stat": "zarr.json:1:3\n", "value": [9, 64, 64]}}


@pytest.mark.parametrize("command", VIEWS)
def test_views_of_a_validated_sweep_import_no_ultrack(ran: Path, command: str) -> None:
    r = _view(command, ran)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = _imported(r.stderr)
    assert "gridsearch" in imported  # the probe sees our own imports
    assert not imported & {"ultrack", "torch"}, f"{command} imported ultrack"
    assert not imported & set(HEAVY), f"{command} imported {sorted(imported & set(HEAVY))}"


@pytest.mark.parametrize("change", [
    ("[-0.1, -0.5]", "[-0.1, heavy]", "tracking.appear_weight"),  # a value ultrack's model refuses
    ("  tracking.appear_weight:", "  tracking.no_such_key: [1]\n  tracking.appear_weight:",
     "no_such_key"),  # a key only ultrack's models know is not one
])
def test_a_changed_sweep_file_is_validated_by_ultracks_models(ran: Path,
                                                              change: tuple[str, str, str]) -> None:
    from click.testing import CliRunner

    from gridsearch.cli import main

    old, new, where = change
    changed = ran.with_name("changed.yaml")  # beside it: the same workdir, holding the record
    changed.write_text(ran.read_text().replace(old, new))
    with pytest.raises(SpecError) as e:
        load(changed)  # what `sweep` says
    assert where in str(e.value)
    for command in VIEWS:
        r = CliRunner().invoke(main, [command, str(changed)])
        assert r.exit_code == 2, (command, r.output)
        assert r.stderr.splitlines() == [f"error: {e.value}"], command
    r = _view("status", changed)  # in a fresh process: refused after importing ultrack's models
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert (r.returncode, lines) == (2, [f"error: {e.value}"])
    assert "ultrack" in _imported(r.stderr)
