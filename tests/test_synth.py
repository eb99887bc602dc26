"""The synthetic movie: reproducible bytes, well-formed arrays, consistent CTC ground truth, trackable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from gridsearch.synth import generate_movie


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _tracks(gt: Path) -> dict[int, tuple[int, int, int]]:
    """man_track.txt as {label: (begin, end, parent)}."""
    rows = [line.split() for line in (gt / "TRA" / "man_track.txt").read_text().splitlines()]
    return {int(lab): (int(b), int(e), int(p)) for lab, b, e, p in rows}


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    generate_movie(tmp_path / "a", n_frames=4, seed=3)
    generate_movie(tmp_path / "b", n_frames=4, seed=3)
    generate_movie(tmp_path / "c", n_frames=4, seed=4)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_regenerating_in_place_drops_stale_frames(tmp_path: Path) -> None:
    generate_movie(tmp_path, n_frames=6)
    paths = generate_movie(tmp_path, n_frames=4)
    assert len(list((paths["gt"] / "TRA").glob("man_track*.tif"))) == 4
    assert zarr.open(str(paths["foreground"]), mode="r").shape[0] == 4


def test_arrays(movie: dict[str, Path]) -> None:
    assert set(movie) == {"foreground", "contours", "gt"}
    for key in ("foreground", "contours"):
        arr = zarr.open(str(movie[key]), mode="r")
        assert arr.shape == (10, 128, 128)
        assert arr.dtype == np.float32
        assert arr.chunks == (1, 128, 128)  # one frame per chunk, as ultrack wants
        data = arr[:]
        assert data.min() >= 0.0 and data.max() <= 1.0
        on_disk = sum(p.stat().st_size for p in movie[key].rglob("*") if p.is_file())
        assert on_disk < data.nbytes  # compressed
    fg = zarr.open(str(movie["foreground"]), mode="r")[:]
    ct = zarr.open(str(movie["contours"]), mode="r")[:]
    labels = np.stack([tifffile.imread(movie["gt"] / "TRA" / f"man_track{t:03d}.tif") for t in range(10)])
    cells = labels > 0
    assert fg[cells].mean() > 0.8 and fg[~cells].mean() < 0.1  # a foreground probability
    assert ct[cells].mean() < ct[~cells].mean()  # contours low inside cells, high outside


def test_ground_truth_is_consistent(movie: dict[str, Path]) -> None:
    gt = movie["gt"]
    tracks = _tracks(gt)
    files = sorted((gt / "TRA").glob("man_track*.tif"))
    assert [f.name for f in files] == [f"man_track{t:03d}.tif" for t in range(10)]
    for t, f in enumerate(files):
        frame = tifffile.imread(f)
        assert frame.dtype == np.uint16 and frame.shape == (128, 128)
        present = set(np.unique(frame).tolist()) - {0}
        assert present == {lab for lab, (b, e, _) in tracks.items() if b <= t <= e}, t
        areas = np.bincount(frame.ravel())[sorted(present)]
        assert areas.min() >= 100 and areas.max() <= 520  # entering cells are partly outside
    assert sum(b == 0 for b, _, _ in tracks.values()) == 8  # n_cells at the start
    children: dict[int, list[int]] = {}
    for lab, (b, _, p) in tracks.items():
        if p:
            children.setdefault(p, []).append(lab)
            assert tracks[p][1] == b - 1  # parent ends the frame before its daughters begin
    assert list(children.values()) == [[9, 10]]  # divisions=1: one parent, two daughters
    assert any(b > 0 and p == 0 for b, _, p in tracks.values())  # a cell drifting in


def test_benchmark_movie(tmp_path: Path) -> None:
    paths = generate_movie(tmp_path, n_frames=20, size=384, n_cells=60, seed=1)
    tracks = _tracks(paths["gt"])
    assert sum(b == 0 for b, _, _ in tracks.values()) == 60
    assert any(p for _, _, p in tracks.values())
    last = tifffile.imread(paths["gt"] / "TRA" / "man_track019.tif")
    assert last.shape == (384, 384)
    assert len(np.unique(last)) - 1 == sum(e == 19 for _, e, _ in tracks.values())


def test_3d(tmp_path: Path) -> None:
    paths = generate_movie(tmp_path, n_frames=3, size=64, n_cells=3, ndim=3)
    assert zarr.open(str(paths["foreground"]), mode="r").shape == (3, 64, 64, 64)
    frame = tifffile.imread(paths["gt"] / "TRA" / "man_track002.tif")
    assert frame.shape == (64, 64, 64) and len(np.unique(frame)) - 1 >= 3


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_movie(tmp_path, ndim=4)
    with pytest.raises(ValueError, match="crowded"):
        generate_movie(tmp_path, size=32, n_cells=20)


def test_ultrack_tracks_the_movie(movie: dict[str, Path], tmp_path: Path) -> None:
    """A sensible configuration tracks the default movie (essentially) perfectly."""
    import ultrack
    from ultrack.config import MainConfig
    from ultrack.core.export.ctc import to_ctc

    from gridsearch.metrics import score

    config = MainConfig()
    config.data_config.working_dir = tmp_path / "work"
    config.segmentation_config.min_area = 60
    config.segmentation_config.max_area = 1000
    config.linking_config.max_distance = 15.0
    config.tracking_config.appear_weight = -0.5
    config.tracking_config.solver_name = "CBC"
    fg = zarr.open(str(movie["foreground"]), mode="r")
    ct = zarr.open(str(movie["contours"]), mode="r")
    ultrack.segment(fg, ct, config)
    ultrack.link(config)
    ultrack.solve(config)
    to_ctc(tmp_path / "res", config)
    result = score(tmp_path / "res", movie["gt"])
    assert result["TRA"] >= 0.95, result
