"""The input files: the movie's arrays (readable, their identity) and the CTC ground truth checked
against the movie, all before any work starts."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridsearch.core.errors import first_line
from gridsearch.stages import canonical_json
from gridsearch.validate import SpecError

SAMPLED_CHUNKS = 64
_METADATA = ("zarr.json", ".zarray", ".zattrs")


def open_array(path: Path, label: str, spec_path: Path) -> tuple[Any, tuple[int, ...]]:
    """The zarr array at `path` and its shape, T x (Z) x Y x X; bad input in one line otherwise."""
    if not path.exists():
        raise SpecError(f"{spec_path}: data.{label}: {path} does not exist")
    try:
        import zarr

        arr = zarr.open(str(path), mode="r")
        shape = tuple(int(s) for s in arr.shape)
    except Exception as e:  # zarr raises many kinds for a bad store
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(f"{spec_path}: data.{label}: {path} is not a readable zarr array: {reason}") from None
    if len(shape) not in (3, 4):
        raise SpecError(f"{spec_path}: data.{label}: expected T x (Z) x Y x X, got shape {shape}")
    return arr, shape


class Headers:
    """What was read from the inputs' headers (an array's zarr metadata, a TIFF's shape), each with
    the size and mtime of the files it came from. `sweep` records what it read; a view given that
    record takes a header from it while those files are unchanged, which is what the data identity
    trusts too, and so imports neither zarr nor tifffile (0.3-0.7 s with numpy)."""

    def __init__(self, known: Mapping[str, Any] | None = None) -> None:
        self.known = dict(known or {})
        self.seen: dict[str, Any] = {}  # what this load read or took: the next record

    def get(self, path: Path, stat: str, read: Callable[[], Any]) -> Any:
        """The header of `path` (JSON-able) whose files' stat lines are `stat`; `read` it if unknown."""
        old = self.known.get(str(path))
        value = old["value"] if isinstance(old, dict) and old.get("stat") == stat else read()
        self.seen[str(path)] = {"stat": stat, "value": value}
        return value


@dataclass(frozen=True)
class Layout:
    """What an array's identity needs from its zarr metadata."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    sampled: tuple[str, ...]  # store keys of the sampled chunk files (none for a zip store)

    @classmethod
    def of(cls, path: Path, arr: Any) -> Layout:
        keys = () if path.is_file() else tuple(_sampled_chunk_keys(arr))
        return cls(tuple(int(s) for s in arr.shape), str(arr.dtype),
                   tuple(arr.metadata.chunk_grid.chunk_shape), keys)

    def doc(self) -> dict[str, Any]:
        return {"shape": self.shape, "dtype": self.dtype, "chunks": self.chunks, "sampled": self.sampled}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Layout:
        return cls(tuple(doc["shape"]), doc["dtype"], tuple(doc["chunks"]), tuple(doc["sampled"]))


def array_layout(path: Path, label: str, spec_path: Path, headers: Headers) -> Layout:
    """The array's layout, read with zarr (open_array's checks) unless `headers` knows it."""
    if not path.exists():
        raise SpecError(f"{spec_path}: data.{label}: {path} does not exist")

    def read() -> dict[str, Any]:
        arr, _ = open_array(path, label, spec_path)
        return Layout.of(path, arr).doc()

    return Layout.from_doc(headers.get(path, _metadata_lines(path), read))


def _metadata_lines(path: Path) -> str:
    """The size and mtime of an array's metadata files (of the file itself: a zip store)."""
    if path.is_file():
        return _stat_line(path, path.name)
    return "".join(_stat_line(path / name, name) for name in _METADATA)


def _stat_line(f: Path, name: str) -> str:
    try:
        st = f.stat()
    except FileNotFoundError:  # a chunk never written (fill value) is part of the identity too
        return f"{name}:absent\n"
    return f"{name}:{st.st_size}:{st.st_mtime_ns}\n"


def _spread(n: int, k: int) -> Iterable[int]:
    """Up to k indices spread evenly over range(n), first and last included: the same every call."""
    if n <= k:
        return range(n)
    return sorted({j * (n - 1) // (k - 1) for j in range(k)})


def _sampled_chunk_keys(arr: Any) -> list[str]:
    """Store keys of the sampled chunks (shards, when sharded: what is stored as one file), computed
    from the metadata so that the chunk directories are never listed (10^5 entries on Lustre)."""
    chunk_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    grid = tuple(math.ceil(s / c) for s, c in zip(arr.shape, chunk_shape, strict=True))
    keys = []
    for i in _spread(math.prod(grid), SAMPLED_CHUNKS):
        coords, rest = [], i
        for n in reversed(grid):
            rest, c = divmod(rest, n)
            coords.append(c)
        keys.append(arr.metadata.encode_chunk_key(tuple(reversed(coords))))
    return keys


IDENTITY_MARKER = ".identity-sampled"  # in a workdir: its fingerprints use the sampled identity


def uses_full_identity(workdir: Path) -> bool:
    """A workdir whose state predates the sampled identity keeps the full one: its ledger's
    fingerprints were computed with it, and a new identity would read as "the data changed"
    (every trial recomputed). New workdirs get the marker at their first sweep."""
    has_state = (workdir / "state.db").exists() or (workdir / "postgres").exists()
    return has_state and not (workdir / IDENTITY_MARKER).exists()


def full_array_identity(path: Path, arr: Any) -> str:
    """The identity of workdirs made before sampling: the size and mtime of every stored file.
    `arr`: the zarr array or its Layout."""
    h = hashlib.sha256(canonical_json([str(path.resolve()), tuple(int(s) for s in arr.shape),
                                       str(arr.dtype)]).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def array_identity(path: Path, arr: Any) -> str:
    """The identity of an open zarr array (layout_identity)."""
    return layout_identity(path, Layout.of(path, arr))


def layout_identity(path: Path, layout: Layout) -> str:
    """Cheap identity of an input array, without hashing its content (minutes on a large movie) or
    stat-ing every chunk file (slow on Lustre with 10^5 chunks).

    What it trusts: shape, dtype and chunking; the size and mtime of the array's metadata files
    (zarr.json, .zarray, .zattrs: re-creating the array rewrites them); the size and mtime of up to
    SAMPLED_CHUNKS chunk files spread evenly over the chunk grid (writing new data over the whole
    array changes them). An in-place edit of chunks the sample misses goes unnoticed: after one,
    run `gridsearch sweep --restart`."""
    h = hashlib.sha256(canonical_json([str(path.resolve()), layout.shape, layout.dtype,
                                       layout.chunks]).encode())
    h.update(_metadata_lines(path).encode())  # a zip store: the one file
    for name in layout.sampled:
        h.update(_stat_line(path / name, name).encode())
    return h.hexdigest()


def check_ground_truth(gt: Path, shape: tuple[int, ...], objective: str | None, spec_path: Path,
                       headers: Headers | None = None) -> None:
    """CTC ground truth that cannot score this movie is refused before any work, not after the
    first trial: one TRA/man_track*.tif per frame, each the movie's spatial shape (one file's header
    is read), and SEG/man_seg*.tif when SEG is the objective."""
    tra = gt / "TRA" / "man_track.txt"
    if not tra.is_file():
        raise SpecError(f"{spec_path}: data.ground_truth: {tra} not found (expected a CTC TRA folder)")
    tifs = sorted(gt.glob("TRA/man_track*.tif"))
    if len(tifs) != shape[0]:
        raise SpecError(f"{spec_path}: data.ground_truth: {len(tifs)} TRA/man_track*.tif file(s) for a movie "
                        f"of {shape[0]} frames; the ground truth must have one per frame")
    def read() -> list[int]:
        import tifffile

        try:
            with tifffile.TiffFile(tifs[0]) as tif:
                return [int(s) for s in tif.series[0].shape]
        except Exception as e:  # tifffile raises many kinds for a bad file
            raise SpecError(f"{spec_path}: data.ground_truth: {tifs[0]} is not a readable TIFF: "
                            f"{first_line(e)}") from None

    gt_shape = tuple((headers or Headers()).get(tifs[0], _stat_line(tifs[0], tifs[0].name), read))
    if gt_shape != shape[1:]:
        raise SpecError(f"{spec_path}: data.ground_truth: {tifs[0].name} has shape {gt_shape}, the movie's "
                        f"frames {shape[1:]}; the ground truth must match the movie")
    if objective == "SEG" and not any(gt.glob("SEG/man_seg*.tif")):
        raise SpecError(f"{spec_path}: objective: SEG needs segmentation ground truth, and {gt / 'SEG'} "
                        "holds no man_seg*.tif; rank by TRA, DET, LNK or CHOTA, or add it")
