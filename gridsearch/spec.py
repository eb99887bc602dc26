"""The sweep file: load, validate everything before any work, expand the grid into trials."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import operator
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gridsearch.core.bulk import gc_paused
from gridsearch.inputs import Headers, Inputs, check_ground_truth, resolve_inputs, uses_full_identity
from gridsearch.stages import (
    EXECUTION_KEYS,
    SECTION_OF,
    Stage,
    canonical_json,
    chain_fingerprint,
    chain_from,
    stage_params_json,
)
from gridsearch.validate import (
    SpecError,
    batch_problem,
    sbatch_mem,
    sbatch_time,
    section_problem,
    workdir_problem,
)
from gridsearch.validated import Validated, digest, read

MAX_TRIALS = 10_000  # default of the sweep file's max_trials
DEFAULT_SLURM_PARALLEL = 4  # databases alive at once on SLURM, unless the sweep file says
# What a trial can be ranked by (all maximised): CTC metrics need ground truth.
CTC_METRICS = ("TRA", "DET", "LNK", "CHOTA", "SEG")
SUMMARY_FIGURES = ("selected_nodes", "tracks", "divisions", "mean_track_length")
SWEEPABLE = tuple(SECTION_OF.values())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # poll_seconds: .inf waits forever


class DataSpec(_Strict):
    """ultrack's inputs (zarr arrays, arrays inside a zarr group, or TIFF stacks), or instance label
    movies (Cellpose, StarDist ...) that gridsearch turns into them once."""

    foreground: Path | None = None
    contours: Path | None = None
    labels: list[Path] | None = None
    ground_truth: Path | None = None

    @model_validator(mode="after")
    def _one_form(self) -> DataSpec:
        arrays = [k for k in ("foreground", "contours") if getattr(self, k) is not None]
        if self.labels is not None and arrays:
            raise ValueError(f"give foreground + contours or labels, not both (got {', '.join(arrays)} "
                             "and labels)")
        if self.labels is not None and not self.labels:
            raise ValueError("labels: empty list; give one or more label movies")
        if self.labels is None and len(arrays) < 2:
            missing = " (contours missing)" if arrays == ["foreground"] else \
                " (foreground missing)" if arrays else ""
            raise ValueError(f"give foreground and contours (ultrack's inputs), or labels: [label movies]"
                             f"{missing}")
        return self


class DatabaseSpec(_Strict):
    kind: Literal["sqlite", "postgresql"] = "sqlite"
    managed: bool = False
    host: str | None = None
    port: int = 5432
    user: str | None = None
    dbname: str | None = None
    keep: bool = False
    listen: str = "127.0.0.1"


class StageResources(_Strict):
    """Checked here, not by sbatch: a format sbatch refuses would fail a sweep half-way through."""

    cpus: int = Field(1, ge=1)
    mem: str = "8G"
    time: str = "01:00:00"

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> str:
        return sbatch_mem(v)

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> str:
        return sbatch_time(v)


class ExecutorSpec(_Strict):
    kind: Literal["local", "slurm"] = "local"
    workers: int = Field(1, ge=1, le=256)
    # ultrack's n_workers: frames per batch (a pool of that many processes per batch). None: 1, and
    # on SLURM each task runs as many one-frame batches in turn as the measured costs call for
    frames_per_batch: int | None = Field(None, ge=1)
    # SLURM only
    partition: str | None = None
    account: str | None = None
    setup: list[str] = Field(default_factory=list)
    max_parallel: int = Field(20, ge=1)
    stages: dict[Literal["segment", "link", "solve", "server", "driver"], StageResources] = Field(
        default_factory=dict
    )
    sbatch_args: list[str] = Field(default_factory=list)
    poll_seconds: float = Field(2.0, gt=0)


class SweepFile(_Strict):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    workdir: Path
    data: DataSpec
    config: Path | dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    database: Literal["sqlite", "postgresql"] | DatabaseSpec = "sqlite"
    executor: Literal["local", "slurm"] | ExecutorSpec = "local"
    objective: str | None = None
    keep_label_images: bool = True
    max_trials: int = Field(MAX_TRIALS, ge=1)  # a guard against a typo'd grid, not a hard limit
    # databases alive at once: branches of the grid run together (None: Sweep.parallel chooses)
    parallel: int | None = Field(None, ge=1, le=64)

    @field_validator("database", mode="after")
    @classmethod
    def _db(cls, v: Any) -> DatabaseSpec:
        return DatabaseSpec(kind=v) if isinstance(v, str) else v

    @field_validator("executor", mode="after")
    @classmethod
    def _ex(cls, v: Any) -> ExecutorSpec:
        return ExecutorSpec(kind=v) if isinstance(v, str) else v


@dataclass(frozen=True)
class Trial:
    """One parameter set. `key` is its identity across runs (a hash of what it computes)."""

    number: int  # position in the grid's cartesian order
    params: dict[str, Any]
    sections: dict[str, dict[str, Any]]  # validated ultrack sections (JSON mode), no [data]
    fingerprints: dict[Stage, str]  # per stage, chained: each covers everything upstream

    @property
    def key(self) -> str:
        return self.fingerprints[Stage.SOLVE][:12]

    def prefix(self, stage: Stage) -> str:
        return self.fingerprints[stage]


@dataclass
class Sweep:
    """A loaded, validated sweep: everything the planner and executors need."""

    path: Path
    file: SweepFile
    base_sections: dict[str, dict[str, Any]]
    inputs: Inputs  # the arrays the stages read, the movie's shape and the data identity
    trials: list[Trial]
    full_identity: bool = False  # a workdir older than the sampled data identity (inputs.py)
    validated: Validated | None = None  # what ultrack's models made of it, for the workdir's record
    headers: Headers = field(default_factory=Headers)  # what was read of the inputs, for the same

    @property
    def data_identity(self) -> str:
        return self.inputs.identity

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inputs.shape

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def workdir(self) -> Path:
        return self.file.workdir

    @property
    def grid_keys(self) -> list[str]:
        return list(self.file.grid)

    @property
    def database(self) -> DatabaseSpec:
        assert isinstance(self.file.database, DatabaseSpec)
        return self.file.database

    @property
    def executor(self) -> ExecutorSpec:
        assert isinstance(self.file.executor, ExecutorSpec)
        return self.file.executor

    @property
    def parallel(self) -> int:
        """Databases alive at once: as set, else chosen from the executor. SLURM: 4, where the
        database can be forked (a managed server): the cluster runs the branches' arrays side by
        side and a fork costs a CREATE DATABASE. Local: 1: the branches would share this
        machine's cores, which one branch's batches already use."""
        if self.file.parallel is not None:
            return self.file.parallel
        db = self.database
        return DEFAULT_SLURM_PARALLEL if self.executor.kind == "slurm" and db.kind == "postgresql" and \
            db.managed else 1

    @property
    def base_fingerprint(self) -> str:
        """What must not change under a sweep's feet: base config and data (the grid may grow)."""
        return hashlib.sha256(
            canonical_json({"base": self.base_sections, "data": self.data_identity}).encode()
        ).hexdigest()[:16]

    @property
    def objective(self) -> str:
        if self.file.objective:
            return self.file.objective
        return "TRA" if self.file.data.ground_truth else "mean_track_length"


def _is_tag(part: Any) -> bool:
    """pydantic names the branch of a union in an error's location: `literal['local','slurm']`."""
    return isinstance(part, str) and ("[" in part or part in ("DatabaseSpec", "ExecutorSpec"))


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not _is_tag(p)) or "<top>"


def _first_error(err: ValidationError) -> tuple[dict[str, Any], int]:
    """The error to show and how many others. A union field (`executor: slurm` or a mapping)
    fails once per branch: the deepest error is in the branch the input was written for."""
    errors: list[Any] = err.errors()
    first = errors[0]
    if len(first["loc"]) > 1 and _is_tag(first["loc"][1]):
        field = first["loc"][:1]
        first = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
        return first, sum(1 for e in errors if e["loc"][:1] != field)
    return first, len(errors) - 1


def _pydantic_line(prefix: str, err: ValidationError) -> str:
    first, others = _first_error(err)
    loc = _where(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {others} more)" if others else ""
    return f"{prefix}{loc}: {msg}{more}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read sweep file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep file must be a mapping of keys (name, workdir, data, grid …)")
    return raw


def _resolve(base: Path, p: Path) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(str(p))))
    return p if p.is_absolute() else (base / p)


def _load_base_config(cfg: Path | dict[str, Any], base: Path, spec_path: Path) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    return read_config_toml(_resolve(base, cfg), f"{spec_path}: config: ")


def read_config_toml(path: Path, where: str) -> dict[str, Any]:
    """An ultrack config.toml as written, all its sections; `where` starts the one-line error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise SpecError(f"{where}cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{where}{path} is not valid TOML: {e}") from None


def base_config(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An ultrack config without its [data] section (gridsearch owns it: where each database
    lives), as written and as validated by ultrack's models (defaults filled in, JSON mode)."""
    own = own_sections(raw, where)
    return own, _validate_sections(own, where)


def own_sections(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The config's sections but [data]; an unknown section is bad input."""
    unknown = set(raw) - set(SWEEPABLE) - {"data"}
    if unknown:
        raise SpecError(f"{where}{sorted(unknown)[0]}: unknown ultrack config section")
    return {k: v for k, v in raw.items() if k != "data"}


def _validate_sections(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Validate with ultrack's own models (they forbid unknown keys); return JSON-mode sections."""
    from ultrack.config.config import MainConfig  # heavy import: only once validation is needed

    try:
        cfg = MainConfig.model_validate({**raw, "data": None})
    except ValidationError as e:
        raise SpecError(_pydantic_line(where, e)) from None
    python = cfg.model_dump(by_alias=True)  # not JSON mode: that turns NaN into null
    problem = section_problem({s: python[s] for s in SWEEPABLE})
    if problem:
        raise SpecError(f"{where}{problem}")
    dumped = cfg.model_dump(by_alias=True, mode="json")
    return {s: dumped[s] for s in SWEEPABLE}


def _check_grid(grid: dict[str, list[Any]], max_trials: int, spec_path: Path) -> None:
    if not grid:
        raise SpecError(f"{spec_path}: grid: empty; give at least one key with a list of values")
    total = 1
    for key, values in grid.items():
        section, _, name = key.partition(".")
        if section not in SWEEPABLE or not name or "." in name:
            raise SpecError(
                f"{spec_path}: grid.{key}: only segmentation.*, linking.* and tracking.* keys can be swept"
            )
        if key in EXECUTION_KEYS:
            raise SpecError(
                f"{spec_path}: grid.{key}: an execution setting (it does not change results); "
                "set it under executor instead"
            )
        if not values:
            raise SpecError(f"{spec_path}: grid.{key}: empty list of values")
        seen = {canonical_json(v) for v in values}
        if len(seen) != len(values):
            raise SpecError(f"{spec_path}: grid.{key}: duplicate values in {values}")
        total *= len(values)
    if total > max_trials:
        raise SpecError(
            f"{spec_path}: grid: {total:,} combinations exceeds max_trials ({max_trials:,}); "
            "raise max_trials in the sweep file, split the sweep or narrow the lists"
        )


def _check_options(sf: SweepFile, spec_path: Path) -> None:
    """Objective, database and executor: combinations that cannot work."""
    if sf.objective is not None:
        allowed = list(SUMMARY_FIGURES) + (list(CTC_METRICS) if sf.data.ground_truth else [])
        if sf.objective not in allowed:
            why = " (metrics need data.ground_truth)" if sf.objective in CTC_METRICS else ""
            raise SpecError(
                f"{spec_path}: objective: {sf.objective!r} is not one of {', '.join(allowed)}{why}"
            )
    db, ex = sf.database, sf.executor
    assert isinstance(db, DatabaseSpec) and isinstance(ex, ExecutorSpec)
    if db.kind == "sqlite" and ex.workers > 1:
        raise SpecError(
            f"{spec_path}: executor.workers: {ex.workers} parallel writers need database: postgresql "
            "(SQLite takes one writer at a time)"
        )
    if db.kind == "sqlite" and ex.kind == "slurm":
        raise SpecError(f"{spec_path}: executor: slurm needs database: postgresql (jobs on many nodes)")
    if db.kind == "postgresql" and not db.managed and not (db.host and db.user):
        raise SpecError(
            f"{spec_path}: database: an existing server needs host and user (or set managed: true)"
        )


def _resolve_data(sf: SweepFile, base: Path, spec_path: Path, headers: Headers) -> Inputs:
    """Resolve the data paths and check them against each other (movie, ground truth)."""
    data = sf.data
    for key in ("foreground", "contours"):
        if getattr(data, key) is not None:
            setattr(data, key, _resolve(base, getattr(data, key)))
    if data.labels is not None:
        data.labels = [_resolve(base, p) for p in data.labels]
    inputs = resolve_inputs(data.foreground, data.contours, data.labels, sf.workdir, spec_path,
                            uses_full_identity(sf.workdir), headers)
    if data.ground_truth is not None:
        data.ground_truth = _resolve(base, data.ground_truth)
        check_ground_truth(data.ground_truth, inputs.shape, sf.objective, spec_path, headers)
    return inputs


class _Sections:
    """Each distinct section of the grid, validated once, and the stage fingerprints of each
    distinct prefix: what `_expand` looks up per trial."""

    def __init__(self, keys: list[str], base_raw: dict[str, Any], data_identity: str, spec_path: Path,
                 batching: tuple[int, int], validated: Validated | None) -> None:
        self.base_raw, self.data_identity, self.spec_path = base_raw, data_identity, spec_path
        self.batching, self.validated = batching, validated
        self.positions = {s: [(k, i) for i, k in enumerate(keys) if k.partition(".")[0] == s]
                          for s in SWEEPABLE}
        # per section: its keys' value indices -> the section
        self.cache: dict[str, dict[Any, dict[str, Any]]] = {s: {} for s in SWEEPABLE}
        self.seg_fp: dict[Any, str] = {}
        # (segment, link) value indices -> both sections, their fingerprints, the solve fingerprint's
        # shared hash; tracking value indices -> the section and its hashed JSON
        self.prefixes: dict[tuple[Any, Any], _Prefix] = {}
        self.tracks: dict[Any, tuple[dict[str, Any], bytes]] = {}

    def section(self, name: str, params: dict[str, Any], idx: tuple[int, ...]) -> dict[str, Any] | None:
        swept = {k: idx[i] for k, i in self.positions[name]}
        validated = self.validated
        if validated is not None and validated.trusted:
            sec = validated.section(name, swept)
            return None if section_problem({name: sec}) else sec
        sec = _valid_section(name, self.base_raw, params)
        if sec is not None and validated is not None:
            validated.record(name, swept, sec)
        return sec

    def add(self, params: dict[str, Any], idx: tuple[int, ...], ks: Any, kl: Any, kt: Any) -> None:
        seg_c, link_c, track_c = (self.cache[s] for s in ("segmentation", "linking", "tracking"))
        seg, link, track = seg_c.get(ks), link_c.get(kl), track_c.get(kt)
        if seg is None:
            seg = self.section("segmentation", params, idx)
        if link is None:
            link = self.section("linking", params, idx)
        if track is None and (track := self.section("tracking", params, idx)) is not None:
            track = None if batch_problem({"tracking": track}, *self.batching) else track
        if seg is None or link is None or track is None:
            _validate_trial(params, self.base_raw, self.spec_path, self.batching)  # raises the line naming it
            raise AssertionError(f"{params}: a section refused alone passed in its trial")
        seg_c[ks], link_c[kl], track_c[kt] = seg, link, track
        fs = self.seg_fp.get(ks)
        if fs is None:
            fs = self.seg_fp[ks] = chain_fingerprint(self.data_identity, Stage.SEGMENT,
                                                     stage_params_json(Stage.SEGMENT, seg))
        if (ks, kl) not in self.prefixes:
            fl = chain_fingerprint(fs, Stage.LINK, stage_params_json(Stage.LINK, link))
            self.prefixes[ks, kl] = (seg, link, fs, fl, chain_from(fl, Stage.SOLVE))
        if kt not in self.tracks:
            self.tracks[kt] = (track, stage_params_json(Stage.SOLVE, track).encode())


def _expand(grid: dict[str, list[Any]], base_raw: dict[str, Any], data_identity: str,
            spec_path: Path, batching: tuple[int, int], validated: Validated | None = None) -> list[Trial]:
    """The cartesian product, each trial validated by ultrack's models and by ours, every stage
    with at least one batch for `batching` (frames, frames per batch); no two alike.

    Every rule looks at one section at a time (ultrack's MainConfig has no cross-section
    validator; section_problem and batch_problem neither), so a trial whose three sections were
    each seen in an earlier valid trial is valid too: only a trial with an unseen section is
    validated, in full and as before, so the first bad trial raises the same line. Per-stage
    fingerprints are computed once per distinct prefix: 100,000 trials plan in about a second.

    `validated`: a trusted record gives each new section instead of ultrack's models (ours still
    check it); otherwise what the models make of each new section is noted in it."""
    keys = list(grid)
    values = [grid[k] for k in keys]
    pick = {s: _picker([i for i, k in enumerate(keys) if k.partition(".")[0] == s]) for s in SWEEPABLE}
    pick_seg, pick_link, pick_track = pick["segmentation"], pick["linking"], pick["tracking"]
    sections = _Sections(keys, base_raw, data_identity, spec_path, batching, validated)
    prefixes, tracks = sections.prefixes, sections.tracks

    segment_, link_, solve_ = Stage.SEGMENT, Stage.LINK, Stage.SOLVE  # locals: the loop runs 10^5 times
    trials: list[Trial] = []
    combos = zip(itertools.product(*values), itertools.product(*(range(len(v)) for v in values)), strict=True)
    for number, (combo, idx) in enumerate(combos):
        params = dict(zip(keys, combo, strict=True))
        pk, kt = (pick_seg(idx), pick_link(idx)), pick_track(idx)
        prefix, tr = prefixes.get(pk), tracks.get(kt)
        if prefix is None or tr is None:
            sections.add(params, idx, *pk, kt)
            prefix, tr = prefixes[pk], tracks[kt]
        seg, link, fs, fl, solve_of = prefix
        track, tj = tr
        fps = {segment_: fs, link_: fl, solve_: solve_of(tj)}
        trials.append(Trial(number, params, {"segmentation": seg, "linking": link, "tracking": track}, fps))
    assert math.prod(len(v) for v in grid.values()) == len(trials)
    _refuse_duplicates(trials, keys, spec_path)
    return trials


def _refuse_duplicates(trials: list[Trial], keys: list[str], spec_path: Path) -> None:
    """Two grid points that ultrack's models make the same config (e.g. 1 and 1.0) would be one
    trial run twice: refused, naming the values."""
    if len({t.fingerprints[Stage.SOLVE] for t in trials}) == len(trials):
        return
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.key in seen:
            a, b = seen[t.key].params, t.params
            diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in keys if a[k] != b[k])
            raise SpecError(f"{spec_path}: grid: duplicate values ({diff}) give the same ultrack config")
        seen[t.key] = t


_Prefix = tuple[dict[str, Any], dict[str, Any], str, str, Callable[[bytes], str]]


def _picker(positions: list[int]) -> Callable[[tuple[int, ...]], Any]:
    """The value indices of one section's keys in a combination: a hashable cache key."""
    if not positions:
        return lambda idx: ()
    return operator.itemgetter(*positions)


def _valid_section(section: str, base_raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """One section of a trial as `_validate_sections` makes it (same models, same rules), or None
    when it is refused. Validating the section's own model, not the whole MainConfig, divides the
    cost of a new section by about three."""
    from ultrack.config.config import MainConfig

    raw = dict(base_raw.get(section, {}))
    for key, value in params.items():
        sec, _, name = key.partition(".")
        if sec == section:
            raw[name] = value
    model = _section_models(MainConfig)[section]
    try:
        cfg = model.model_validate(raw)
    except ValidationError:
        return None
    if section_problem({section: cfg.model_dump(by_alias=True)}):
        return None
    return cfg.model_dump(by_alias=True, mode="json")


@functools.cache
def _section_models(main: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """ultrack's model of each sweepable section, as MainConfig nests it."""
    out = {f.alias: f.annotation for f in main.model_fields.values() if f.alias in SWEEPABLE}
    assert all(isinstance(m, type) and issubclass(m, BaseModel) for m in out.values()), out
    return out  # type: ignore[return-value]


def _validate_trial(params: dict[str, Any], base_raw: dict[str, Any], spec_path: Path,
                    batching: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """One trial's sections, validated by ultrack's models and ours, or the one line why not."""
    raw_sections = {s: dict(base_raw.get(s, {})) for s in SWEEPABLE}
    for key, value in params.items():
        section, _, name = key.partition(".")
        raw_sections[section][name] = value
    where = f"{spec_path}: grid ({', '.join(f'{k}={v}' for k, v in params.items())}): "
    sections = _validate_sections(raw_sections, where)
    problem = batch_problem(sections, *batching)
    if problem:
        raise SpecError(f"{where}{problem}")
    return sections


def load(path: str | Path, *, trust: bool = False) -> Sweep:
    """Everything is checked here, before any file or database is touched. `trust`: take what
    ultrack's models would make of the config from the workdir's record when it is the record of
    this very config, and the inputs' headers while their files are unchanged (validated.py),
    rather than importing ultrack, zarr and tifffile; views do, `sweep` never."""
    spec_path = Path(path)
    raw = _read_yaml(spec_path)
    try:
        sf = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_pydantic_line(f"{spec_path}: ", e)) from None
    base = spec_path.resolve().parent
    _check_grid(sf.grid, sf.max_trials, spec_path)
    _check_options(sf, spec_path)
    sf.workdir = _resolve(base, sf.workdir)
    if problem := workdir_problem(sf.workdir):
        raise SpecError(f"{spec_path}: workdir: {problem}")
    record = read(sf.workdir) if trust else None
    headers = Headers(record.headers if record else None)
    inputs = _resolve_data(sf, base, spec_path, headers)
    where = f"{spec_path}: config."
    base_raw = own_sections(_load_base_config(sf.config, base, spec_path), where)
    fed = digest(base_raw, sf.grid)
    validated = record.config(fed) if record else None
    if validated is not None:
        base_sections = validated.base
        if problem := section_problem(base_sections):
            raise SpecError(f"{where}{problem}")
    else:
        base_sections = _validate_sections(base_raw, where)
        validated = Validated.start(fed, base_sections, sf.grid)
    sweep = Sweep(spec_path, sf, base_sections, inputs, [], uses_full_identity(sf.workdir),
                  validated, headers)
    batching = (inputs.shape[0], sweep.executor.frames_per_batch or 1)
    with gc_paused():
        sweep.trials = _expand(sf.grid, base_raw, inputs.identity, spec_path, batching, validated)
    return sweep
