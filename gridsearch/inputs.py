"""The input files: the movie's arrays (zarr arrays, arrays inside a zarr group, TIFF stacks, or
instance label movies to turn into ultrack's inputs), their identity, and the CTC ground truth
checked against the movie, all before any work starts. What gridsearch makes from them in the
workdir (a TIFF's zarr copy, the labels' foreground and contours) is described here as `Made`
and made by convert.py."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridsearch.core.errors import first_line
from gridsearch.stages import canonical_json
from gridsearch.validate import SpecError

SAMPLED_CHUNKS = 64
_METADATA = ("zarr.json", ".zarray", ".zattrs")
_GROUP_METADATA = ("zarr.json", ".zgroup")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
INPUTS_DIR = "inputs"  # in the workdir: the arrays made from TIFF stacks or label movies
# How label movies become foreground + contours: part of the data identity, so that a change of
# recipe reads as changed data. sigma None: contours not smoothed (ultrack's default).
LABELS_SIGMA = None
LABELS_RECIPE = f"ultrack.utils.labels_to_contours(sigma={LABELS_SIGMA})"


@dataclass(frozen=True)
class Source:
    """One input file as the user named it: a zarr array or a TIFF stack."""

    path: Path
    kind: str  # "zarr" or "tiff"
    shape: tuple[int, ...]
    dtype: str
    identity: str


@dataclass(frozen=True)
class Made:
    """Arrays gridsearch makes once in the workdir from the user's files (convert.py makes them):
    a TIFF stack's zarr copy, or the foreground and contours of label movies."""

    sources: tuple[Path, ...]
    targets: tuple[Path, ...]  # labels: (foreground, contours); a TIFF copy: one array
    identity: str  # of the sources: a made array is trusted only while it records this one
    labels: bool


@dataclass(frozen=True)
class Inputs:
    """What the stages read: the zarr arrays every worker opens by path (the user's, or made in
    the workdir), the movie's shape and the data identity, which is of the user's files."""

    foreground: Path
    contours: Path
    shape: tuple[int, ...]
    identity: str
    made: tuple[Made, ...] = ()


def _where(spec_path: Path, label: str) -> str:
    return f"{spec_path}: data.{label}"


def _check_dims(shape: tuple[int, ...], label: str, spec_path: Path) -> None:
    if len(shape) not in (3, 4):
        raise SpecError(f"{_where(spec_path, label)}: expected T x (Z) x Y x X, got shape {shape}")


def _zarr_group(path: Path) -> Any | None:
    """The zarr group stored at directory `path`, or None when it holds none."""
    if not path.is_dir() or not any((path / m).is_file() for m in _GROUP_METADATA):
        return None
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except Exception:  # an array, or unreadable metadata: not a group
        return None


def _members(group: Any) -> str:
    names = sorted(group.array_keys())
    if not names:
        return "it holds no array"
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"it holds: {shown}"


def _missing(path: Path, label: str, spec_path: Path) -> str:
    """Why `path` cannot be found: a name inside a zarr group that the group does not hold, or a
    path that does not exist at all."""
    for parent in path.parents:
        if parent.exists():
            group = _zarr_group(parent)
            if group is not None:
                return (f"{_where(spec_path, label)}: {parent} is a zarr group without an array "
                        f"{path.relative_to(parent)} ({_members(group)})")
            break
    return f"{_where(spec_path, label)}: {path} does not exist"


def open_array(path: Path, label: str, spec_path: Path) -> tuple[Any, tuple[int, ...]]:
    """The zarr array at `path` (an array's own directory, also inside a zarr group:
    `segments.zarr/foreground`) and its shape, T x (Z) x Y x X; bad input in one line otherwise."""
    if not path.exists():
        raise SpecError(_missing(path, label, spec_path))
    group = _zarr_group(path)
    if group is not None:
        example = next(iter(sorted(group.array_keys())), "foreground")
        raise SpecError(f"{_where(spec_path, label)}: {path} is a zarr group, not an array; name the "
                        f"array inside it, e.g. {path / example} ({_members(group)})")
    try:
        import zarr

        arr = zarr.open_array(str(path), mode="r")
        shape = tuple(int(s) for s in arr.shape)
    except Exception as e:  # zarr raises many kinds for a bad store
        raise SpecError(f"{_where(spec_path, label)}: {path} is not a readable zarr array: "
                        f"{first_line(e)}") from None
    _check_dims(shape, label, spec_path)
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
        raise SpecError(_missing(path, label, spec_path))

    def read() -> dict[str, Any]:
        arr, _ = open_array(path, label, spec_path)
        return Layout.of(path, arr).doc()

    return Layout.from_doc(headers.get(path, _metadata_lines(path), read))


def _metadata_lines(path: Path) -> str:
    """The size and mtime of an array's metadata files (of the file itself: a zip store)."""
    if path.is_file():
        return _stat_line(path, path.name)
    return "".join(_stat_line(path / name, name) for name in _METADATA)


def is_tiff(path: Path) -> bool:
    """By its first bytes, not its name: `.tif`, `.tiff`, `.ome.tif` or none at all."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _tiff_source(path: Path, label: str, spec_path: Path, headers: Headers) -> Source:
    """A TIFF stack's first image series; its identity is the file's size and mtime (hashing the
    content would read the whole movie at every command)."""
    stat = _stat_line(path, path.name)

    def read() -> list[Any]:
        import tifffile

        tifffile_log = logging.getLogger("tifffile")
        level = tifffile_log.level
        tifffile_log.setLevel(logging.CRITICAL)  # it logs what it skips: the line below says it once
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series
                if not series:
                    raise ValueError("no image in it")
                shape, dtype = [int(s) for s in series[0].shape], str(series[0].dtype)
        except Exception as e:  # tifffile raises many kinds for a bad file
            raise SpecError(f"{_where(spec_path, label)}: {path} is not a readable TIFF: "
                            f"{first_line(e)}") from None
        finally:
            tifffile_log.setLevel(level)
        if len(series) > 1:
            raise SpecError(f"{_where(spec_path, label)}: {path} holds {len(series)} image series; give "
                            "one T x (Z) x Y x X stack per file")
        return [shape, dtype]

    shape_list, dtype = headers.get(path, stat, read)
    shape = tuple(shape_list)
    _check_dims(shape, label, spec_path)
    st = path.stat()
    identity = hashlib.sha256(canonical_json(["tiff", str(path.resolve()), shape, dtype, st.st_size,
                                              st.st_mtime_ns]).encode()).hexdigest()
    return Source(path, "tiff", shape, dtype, identity)


def open_source(path: Path, label: str, spec_path: Path, full_identity: bool = False,
                headers: Headers | None = None) -> Source:
    """An input as given: a zarr array (maybe inside a group) or a TIFF stack; one line otherwise.
    `headers` may know its header already (a view of a sweep that recorded it)."""
    headers = headers if headers is not None else Headers()
    if path.is_file():
        if is_tiff(path):
            return _tiff_source(path, label, spec_path, headers)
        raise SpecError(f"{_where(spec_path, label)}: {path} is neither a zarr array nor a TIFF stack")
    layout = array_layout(path, label, spec_path, headers)
    identity = (full_array_identity if full_identity else layout_identity)(path, layout)
    return Source(path, "zarr", layout.shape, layout.dtype, identity)


def resolve_inputs(foreground: Path | None, contours: Path | None, labels: Sequence[Path] | None,
                   workdir: Path, spec_path: Path, full_identity: bool = False,
                   headers: Headers | None = None) -> Inputs:
    """The arrays the stages read, from foreground + contours (zarr or TIFF) or from label movies.

    TIFF stacks and label movies are read where they are for the checks and the identity; the
    workers read zarr copies made in workdir/inputs at the sweep's start (convert.py says why)."""
    made_dir = workdir / INPUTS_DIR
    if labels:
        import numpy as np

        movies = [open_source(p, f"labels[{i}]", spec_path, headers=headers) for i, p in enumerate(labels)]
        shape = movies[0].shape
        for i, m in enumerate(movies):
            if m.shape != shape:
                raise SpecError(f"{_where(spec_path, f'labels[{i}]')}: shape {m.shape} differs from "
                                f"labels[0]'s {shape}; label movies must have the same shape")
            if not (np.issubdtype(np.dtype(m.dtype), np.integer) or m.dtype == "bool"):
                raise SpecError(f"{_where(spec_path, f'labels[{i}]')}: dtype {m.dtype}; instance labels "
                                "must be integers (one id per cell, 0 for background)")
        _check_frames(shape, "labels[0]", spec_path)
        identity = hashlib.sha256(canonical_json(["labels", LABELS_RECIPE, [m.identity for m in movies]])
                                  .encode()).hexdigest()
        fg, ct = made_dir / "foreground.zarr", made_dir / "contours.zarr"
        made = Made(tuple(m.path for m in movies), (fg, ct), identity, labels=True)
        return Inputs(fg, ct, shape, identity, (made,))
    assert foreground is not None and contours is not None  # DataSpec requires one of the two forms
    fg_src = open_source(foreground, "foreground", spec_path, full_identity, headers)
    ct_src = open_source(contours, "contours", spec_path, full_identity, headers)
    if fg_src.shape != ct_src.shape:
        raise SpecError(f"{spec_path}: data: foreground {fg_src.shape} and contours {ct_src.shape} must "
                        "have the same shape")
    _check_frames(fg_src.shape, "foreground", spec_path)
    paths, copies = [], []
    for src, name in ((fg_src, "foreground"), (ct_src, "contours")):
        if src.kind == "tiff":
            target = made_dir / f"{name}.zarr"
            copies.append(Made((src.path,), (target,), src.identity, labels=False))
            paths.append(target)
        else:
            paths.append(src.path)
    identity = hashlib.sha256(f"{fg_src.identity}:{ct_src.identity}".encode()).hexdigest()
    return Inputs(paths[0], paths[1], fg_src.shape, identity, tuple(copies))


def _check_frames(shape: tuple[int, ...], label: str, spec_path: Path) -> None:
    if shape[0] < 2:
        raise SpecError(f"{_where(spec_path, label)}: {shape[0]} frame(s); tracking needs at least 2")


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
