"""Inputs people have: TIFF stacks, arrays inside a zarr group, instance label movies (Cellpose,
StarDist); what gridsearch makes from them is made once, atomically, and follows their changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from helpers import comparable, write_spec

from gridsearch import convert, results
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.inputs import INPUTS_DIR, resolve_inputs
from gridsearch.spec import SpecError, load

ONE_TRIAL = ("grid:\n  segmentation.min_area: [30]\n  linking.max_distance: [15.0]\n"
             "  tracking.appear_weight: [-0.5]\n")


def _table(spec: Path) -> pd.DataFrame:
    with existing_ledger(load(spec)) as led:
        return results.table(load(spec), led)


def _array(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path), mode="r")[:])


def _tiff_copies(movie: dict[str, Path], out: Path) -> dict[str, Path]:
    """The movie as TIFF stacks: foreground uncompressed, contours zlib-compressed."""
    out.mkdir(parents=True, exist_ok=True)
    tiffs = {k: out / f"{k}.tif" for k in ("foreground", "contours")}
    tifffile.imwrite(tiffs["foreground"], _array(movie["foreground"]))
    tifffile.imwrite(tiffs["contours"], _array(movie["contours"]), compression="zlib")
    return tiffs


def test_tiff_stacks_give_the_zarr_arrays_results(
    tmp_path: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    _, want = sqlite_reference
    tiffs = _tiff_copies(movie, tmp_path / "tif")
    spec = write_spec(tmp_path / "s", tiffs, name="tif")
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (12, 0)
    # the trial keys chain from the data identity (another file): everything else is the same
    pd.testing.assert_frame_equal(comparable(_table(spec)).drop(columns="trial"),
                                  comparable(want).drop(columns="trial"))
    made = spec.parent / "runs" / "tif" / INPUTS_DIR
    for key in ("foreground", "contours"):
        np.testing.assert_array_equal(_array(made / f"{key}.zarr"), _array(movie[key]))
        assert zarr.open_array(str(made / f"{key}.zarr")).chunks[0] == 1  # a frame per chunk
    assert load(spec).inputs.foreground == made / "foreground.zarr"
    stamp = (made / "foreground.zarr" / "zarr.json").stat().st_mtime_ns
    before = load(spec).data_identity
    assert run_sweep(load(spec)).skipped == 12
    assert (made / "foreground.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # not made again
    # a view takes the TIFFs' headers from the sweep's record: tifffile is not opened
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tifffile, "TiffFile", None)
        trusted = load(spec, trust=True)
    assert trusted.validated.trusted and trusted.data_identity == before
    assert trusted.inputs == load(spec).inputs
    # a rewritten TIFF is changed data: refused until --restart, like a changed zarr array
    tifffile.imwrite(tiffs["contours"], _array(movie["contours"])[:, ::-1].copy(), compression="zlib")
    changed = load(spec)
    assert changed.data_identity != before
    assert [m.targets for m in convert.stale(changed.inputs.made)] == [(made / "contours.zarr",)]
    with pytest.raises(SpecError, match="changed"):
        run_sweep(changed)


def test_an_array_inside_a_zarr_group(
    tmp_path: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    """`segments.zarr/foreground`: the layout Ultrack-Cluster's scripts use."""
    _, want = sqlite_reference
    group = zarr.open_group(str(tmp_path / "segments.zarr"), mode="w")
    for key in ("foreground", "contours"):
        data = _array(movie[key])
        group.create_array(key, shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]))[:] = data
    paths = {k: tmp_path / "segments.zarr" / k for k in ("foreground", "contours")}
    spec = write_spec(tmp_path / "s", paths, name="grp", grid=ONE_TRIAL)
    assert not load(spec).inputs.made  # read where it is
    assert run_sweep(load(spec)).completed == 1
    got = _table(spec).iloc[0]
    row = want[(want["segmentation.min_area"] == 30) & (want["linking.max_distance"] == 15.0)
               & (want["tracking.appear_weight"] == -0.5)].iloc[0]
    assert got[results.FIGURES].to_dict() == row[results.FIGURES].to_dict()


def _gt_labels(movie: dict[str, Path]) -> np.ndarray:
    return np.stack([tifffile.imread(f) for f in sorted(movie["gt"].glob("TRA/man_track*.tif"))])


def test_label_movies_end_to_end(tmp_path: Path, movie: dict[str, Path]) -> None:
    """Two segmentations of the movie (a TIFF and a zarr array, as Cellpose and StarDist would
    give them) become ultrack's foreground and contours once, in the workdir."""
    from skimage.segmentation import expand_labels

    labels = _gt_labels(movie)
    tifffile.imwrite(tmp_path / "cellpose.tif", labels, compression="zlib")
    grown = np.stack([expand_labels(frame, 1) for frame in labels])
    zarr.create_array(store=str(tmp_path / "stardist.zarr"), shape=grown.shape, dtype=grown.dtype,
                      chunks=(1, *grown.shape[1:]))[:] = grown
    data = (f"data:\n  labels: [{tmp_path / 'cellpose.tif'}, {tmp_path / 'stardist.zarr'}]\n"
            f"  ground_truth: {movie['gt']}\n")
    grid = "grid:\n  segmentation.min_area: [30, 60]\n  tracking.appear_weight: [-0.5]\n"
    spec = write_spec(tmp_path / "s", movie, name="lab", grid=grid, data=data)
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (2, 0)
    df = _table(spec)
    assert (df["state"] == "done").all()
    # segmentations as good as the ground truth track almost perfectly
    assert (df["TRA"] > 0.95).all(), df[["TRA", "DET", "LNK"]]
    n_cells = len((movie["gt"] / "TRA" / "man_track.txt").read_text().splitlines())
    assert (abs(df["tracks"] - n_cells) <= 2).all(), (df["tracks"].tolist(), n_cells)
    made = spec.parent / "runs" / "lab" / INPUTS_DIR
    fg, ct = _array(made / "foreground.zarr"), _array(made / "contours.zarr")
    np.testing.assert_array_equal(fg, (labels > 0) | (grown > 0))
    assert ct.dtype == np.float32 and 0 < ct.max() <= 1 and ct[~fg].max() > 0  # borders, outside cells
    assert sorted(p.name for p in made.iterdir()) == ["contours.zarr", "foreground.zarr"]  # no leftover
    # a changed label movie is changed data, as a changed foreground is
    before = load(spec).data_identity
    labels[3][labels[3] == labels[3].max()] = 0
    tifffile.imwrite(tmp_path / "cellpose.tif", labels, compression="zlib")
    changed = load(spec)
    assert changed.data_identity != before
    assert convert.stale(changed.inputs.made)
    with pytest.raises(SpecError, match="changed"):
        run_sweep(changed)


def _tiff_inputs(tmp_path: Path, data: np.ndarray) -> tuple[Path, object]:
    tif = tmp_path / "fg.tif"
    tifffile.imwrite(tif, data)
    workdir = tmp_path / "work"
    return workdir, resolve_inputs(tif, tif, None, workdir, tmp_path / "s.yaml")


def test_a_conversion_that_dies_half_way_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)
    _, inputs = _tiff_inputs(tmp_path, data)
    made = inputs.made[0]  # type: ignore[attr-defined]
    target = made.targets[0]

    def dies(source: Path, dest: Path) -> None:
        partial = zarr.create_array(store=str(dest), shape=data.shape, dtype=data.dtype, chunks=(1, 6, 5))
        partial[:2] = data[:2]
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_copy_tiff", dies)
    with pytest.raises(KeyboardInterrupt):
        convert.make(made)
    assert not target.exists() and convert.stale([made]) == [made]
    # killed outright (no clean-up ran): its build dir stays aside, never read, removed next time
    leftover = target.parent / ".making.99999" / target.name
    zarr.create_array(store=str(leftover), shape=data.shape, dtype=data.dtype)
    monkeypatch.undo()
    convert.make(made)
    np.testing.assert_array_equal(_array(target), data)
    assert convert.stale([made]) == [] and not leftover.parent.exists()


def test_a_replacement_killed_between_its_renames_leaves_no_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.ones((3, 4, 4), dtype=np.uint8)
    workdir, inputs = _tiff_inputs(tmp_path, data)
    made = inputs.made[0]  # type: ignore[attr-defined]
    convert.make(made)
    tifffile.imwrite(tmp_path / "fg.tif", data * 2)  # the source changes: made again
    changed = resolve_inputs(tmp_path / "fg.tif", tmp_path / "fg.tif", None, workdir, tmp_path / "s.yaml")
    again = changed.made[0]
    assert convert.stale([again]) == [again]
    real, calls = os.rename, []

    def second_fails(a: object, b: object) -> None:
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        convert.make(again)
    monkeypatch.undo()
    assert not made.targets[0].exists() and convert.stale([again]) == [again]
    convert.make(again)
    np.testing.assert_array_equal(_array(made.targets[0]), data * 2)


def test_a_3d_hyperstack_is_copied_frame_by_frame(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 9, (3, 4, 6, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "fg.tif", data, imagej=True)  # ImageJ's TZYX hyperstack layout
    inputs = resolve_inputs(tmp_path / "fg.tif", tmp_path / "fg.tif", None, tmp_path / "w", tmp_path / "s")
    assert inputs.shape == (3, 4, 6, 5)
    convert.make(inputs.made[0])
    np.testing.assert_array_equal(_array(inputs.foreground), data)
    big = convert.frame_chunks((10, 100, 2048, 2048), 2)  # a frame of 800 MB: split along Z
    assert big[0] == 1 and big[2:] == (2048, 2048) and 2 * np.prod(big) <= convert.CHUNK_BYTES
