"""The data identity behind every fingerprint: cheap on a movie of 10^5 chunks (metadata plus a
fixed sample of chunk files, no directory listing), and what it does and does not notice."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from gridsearch.inputs import SAMPLED_CHUNKS, _sampled_chunk_keys, array_identity, open_array

METADATA = ("zarr.json", ".zarray", ".zattrs")


def _identity(path: Path) -> str:
    arr, _ = open_array(path, "foreground", path)
    return array_identity(path, arr)


@pytest.fixture(params=[2, 3])
def many_chunks(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """300 chunks (T x 3 x 2 grid), in zarr format 2 or 3."""
    path = tmp_path / f"v{request.param}.zarr"
    arr = zarr.create_array(store=str(path), shape=(50, 12, 8), chunks=(1, 4, 4), dtype="uint8",
                            zarr_format=request.param)
    arr[:] = np.arange(50 * 12 * 8, dtype=np.uint64).reshape(50, 12, 8) % 251
    return path


@pytest.fixture
def fs_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """Every stat and directory listing made, by path."""
    calls: dict[str, list[str]] = {"stat": [], "list": []}
    real_stat, real_scandir, real_listdir = os.stat, os.scandir, os.listdir

    def stat(p: object, *a: object, **k: object) -> os.stat_result:
        calls["stat"].append(str(p))
        return real_stat(p, *a, **k)  # type: ignore[arg-type]

    def scandir(p: object = ".") -> object:
        calls["list"].append(str(p))
        return real_scandir(p)  # type: ignore[call-overload]

    def listdir(p: object = ".") -> list[str]:
        calls["list"].append(str(p))
        return real_listdir(p)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    yield calls


def _chunk_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in METADATA)


def test_identity_stats_a_sample_and_lists_no_chunk_directory(
    many_chunks: Path, fs_calls: dict[str, list[str]]
) -> None:
    arr, _ = open_array(many_chunks, "foreground", many_chunks)
    fs_calls["stat"].clear()
    fs_calls["list"].clear()
    array_identity(many_chunks, arr)
    chunk_stats = {p for p in fs_calls["stat"] if Path(p).name not in METADATA and Path(p) != many_chunks}
    assert 0 < len(chunk_stats) <= SAMPLED_CHUNKS
    assert not [p for p in fs_calls["list"] if p.startswith(str(many_chunks))]


def test_identity_is_stable_and_sees_a_rewrite(many_chunks: Path) -> None:
    before = _identity(many_chunks)
    assert _identity(many_chunks) == before
    meta = next(many_chunks / n for n in ("zarr.json", ".zarray") if (many_chunks / n).exists())
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # what re-creating it does
    assert _identity(many_chunks) != before


def test_identity_sees_an_edit_of_a_sampled_chunk_but_trusts_the_others(many_chunks: Path) -> None:
    """The documented trade-off: the first and last chunks are always sampled; with 300 chunks and
    a sample of 64, some chunk in between is not, and editing it in place goes unnoticed."""
    files = _chunk_files(many_chunks)
    assert len(files) == 300
    before = _identity(many_chunks)
    first = files[0]
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    seen = _identity(many_chunks)
    assert seen != before
    arr, _ = open_array(many_chunks, "foreground", many_chunks)
    sampled = {many_chunks / k for k in _sampled_chunk_keys(arr)}
    unsampled = next(f for f in files if f not in sampled)
    st = unsampled.stat()
    os.utime(unsampled, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _identity(many_chunks) == seen


def test_sampled_keys_are_stored_chunks(many_chunks: Path) -> None:
    arr, _ = open_array(many_chunks, "foreground", many_chunks)
    keys = _sampled_chunk_keys(arr)
    assert len(keys) == SAMPLED_CHUNKS and len(set(keys)) == SAMPLED_CHUNKS
    assert all((many_chunks / k).is_file() for k in keys)


def test_sharded_array_samples_its_shard_files(tmp_path: Path) -> None:
    path = tmp_path / "sharded.zarr"
    arr = zarr.create_array(store=str(path), shape=(6, 8, 8), chunks=(1, 4, 4), shards=(1, 8, 8),
                            dtype="uint8")
    arr[:] = 1
    keys = _sampled_chunk_keys(zarr.open(str(path), mode="r"))
    assert sorted(keys) == sorted(str(p.relative_to(path)) for p in _chunk_files(path))


def test_loading_a_sweep_neither_lists_nor_stats_every_chunk(
    tmp_path: Path, fs_calls: dict[str, list[str]]
) -> None:
    """Every CLI call loads the sweep: on Lustre, listing or stat-ing 10^5 chunks costs minutes."""
    from helpers import write_spec

    from gridsearch.spec import load

    movie = {}
    for name in ("foreground", "contours"):
        movie[name] = tmp_path / f"{name}.zarr"
        arr = zarr.create_array(store=str(movie[name]), shape=(200, 8, 8), chunks=(1, 8, 8), dtype="float32")
        arr[:] = 0.5
    spec = write_spec(tmp_path / "s", movie, grid="grid:\n  segmentation.min_area: [30, 60]\n")
    fs_calls["stat"].clear()
    fs_calls["list"].clear()
    load(spec)
    arrays = tuple(str(p) for p in movie.values())
    assert not [p for p in fs_calls["list"] if p.startswith(arrays)]
    chunk_stats = {p for p in fs_calls["stat"] if p.startswith(arrays) and Path(p).name not in METADATA}
    assert len(chunk_stats) <= 2 * SAMPLED_CHUNKS + 2


def _v1_identity(path: Path) -> str:
    """The data identity as gridsearch 0.1 computed it (every stored file), written out here so
    that a change to the kept copy cannot go unnoticed."""
    import hashlib

    from gridsearch.stages import canonical_json

    arr = zarr.open(str(path), mode="r")
    h = hashlib.sha256(canonical_json([str(path.resolve()), tuple(int(s) for s in arr.shape),
                                       str(arr.dtype)]).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def test_workdirs_older_than_sampling_keep_their_fingerprints(tmp_path: Path, movie: dict[str, Path]) -> None:
    """A workdir made before the sampled identity keeps the full one (its ledger's fingerprints),
    so an upgrade never reads as "the data changed"; a new workdir uses sampling from the start."""
    import hashlib

    from helpers import write_spec

    from gridsearch.engine import run_sweep
    from gridsearch.inputs import IDENTITY_MARKER, full_array_identity
    from gridsearch.spec import load

    spec = write_spec(tmp_path, movie, name="old", grid="grid:\n  tracking.appear_weight: [-0.5]\n")
    fresh = load(spec)
    assert not fresh.full_identity
    old_workdir = fresh.workdir
    old_workdir.mkdir(parents=True)
    (old_workdir / "state.db").write_bytes(b"")  # state of gridsearch 0.1: no marker
    old = load(spec)
    fg = zarr.open(str(movie["foreground"]), mode="r")
    assert old.full_identity
    assert full_array_identity(movie["foreground"], fg) == _v1_identity(movie["foreground"])
    expected = hashlib.sha256(f"{_v1_identity(movie['foreground'])}:{_v1_identity(movie['contours'])}"
                              .encode()).hexdigest()
    assert old.data_identity == expected != fresh.data_identity
    (old_workdir / "state.db").unlink()
    out = run_sweep(load(spec))  # a new workdir: marked, and its identity stays the sampled one
    assert out.completed == 1 and (old_workdir / IDENTITY_MARKER).exists()
    again = load(spec)
    assert not again.full_identity and again.data_identity == fresh.data_identity
