"""`gridsearch init`: a commented sweep file from what a user has, an ultrack config.toml and the
data paths: the config as the base, a grid around its own values for the parameters that change
results most, and the database and executor this machine can run. The file is loaded as `plan`
loads it before it is put in place, so what init writes always runs."""

from __future__ import annotations

import os
import re
import shutil
import textwrap
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gridsearch.core.errors import BadInput
from gridsearch.core.files import atomic_path
from gridsearch.spec import SpecError, base_config, load, read_config_toml

# Per local worker: one batch process, about 1.3 GB once ultrack is imported; more than this many
# rarely pays on one machine (they share its disk and the database server).
MAX_LOCAL_WORKERS = 8


@dataclass(frozen=True)
class Machine:
    """What this machine offers a sweep, as probed."""

    slurm_cpus: int | None  # sinfo answered: the CPUs of the cluster's nodes
    postgres: Path | None  # the PostgreSQL server binaries' directory
    cores: int


def probe_machine() -> Machine:
    """SLURM is reachable when `sinfo` answers; PostgreSQL as a managed server would find it."""
    from gridsearch.postgres import PostgresError, find_binaries
    from gridsearch.slurm.gateway import cluster_cpus

    try:
        pg: Path | None = find_binaries()
    except PostgresError:
        pg = None
    slurm = cluster_cpus() if shutil.which("sinfo") else None
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (a job's share, a cgroup)
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return Machine(slurm, pg, cores)


@dataclass(frozen=True)
class Suggestion:
    """One swept key: its values and, for the comment, why it matters and how they were derived."""

    key: str
    values: list[Any]
    why: str
    how: str


def _nice(x: float) -> float:
    return float(f"{x:.3g}")


def _around(base: float, factors: Sequence[float], kind: Callable[[float], Any]) -> list[Any]:
    out: list[Any] = []
    for f in factors:
        v = kind(base * f)
        if v not in out:
            out.append(v)
    return out


def suggest_grid(sections: dict[str, dict[str, Any]]) -> list[Suggestion]:
    """Three parameters, three values each, around the config's own (ultrack's defaults where the
    config has none). Each value passes ultrack's models and gridsearch's rules (validate.py)."""
    seg, link, track = sections["segmentation"], sections["linking"], sections["tracking"]
    area, max_area = int(seg["min_area"]), int(seg["max_area"])
    if area > 0:
        areas, how = _around(area, (0.5, 1, 2), round), f"x0.5, x1, x2 of the config's {area}"
    else:
        areas, how = [0, 25, 50], "the config's 0, then 25 and 50 px"
    if any(a >= max_area for a in areas):  # ultrack needs min_area < max_area
        areas, how = [a for a in areas if a < max_area] or [area], f"{how}, below max_area {max_area}"
    distance = float(link["max_distance"])
    weight = float(track["appear_weight"])
    if weight:
        weights = sorted(_around(weight, (0.1, 1, 10), _nice))
        weight_how = f"x0.1, x1, x10 of the config's {weight:g}: it weighs against link scores in [0, 1]"
    else:
        weights, weight_how = [0.0, -0.01, -0.1], "the config's 0, then small penalties"
    return [
        Suggestion("segmentation.min_area", areas,
                   "the smallest segment kept: too small keeps debris and fragments of cells as cells, "
                   "too large loses small cells", how),
        Suggestion("linking.max_distance", _around(distance, (0.5, 1, 2), _nice),
                   "how far a cell may move between frames: too short breaks the tracks of fast cells, "
                   "too long offers wrong candidates (and slows linking)",
                   f"x0.5, x1, x2 of the config's {distance:g}"),
        Suggestion("tracking.appear_weight", weights,
                   "the cost of starting a track: a large penalty loses cells that enter the field or "
                   "were missed for a frame, a small one keeps short spurious tracks", weight_how),
    ]


@dataclass(frozen=True)
class Backend:
    database: Any  # the sweep file's `database` value
    executor: Any
    detected: str  # the comment: what was found, hence the choice


def choose_backend(m: Machine) -> Backend:
    """SLURM reachable: array jobs and a managed PostgreSQL server as a job. Else, with the
    PostgreSQL binaries and more than 2 cores: local workers on a managed server (parallel writers
    need PostgreSQL). Else SQLite, one batch at a time: nothing to install or run."""
    if m.slurm_cpus:
        return Backend({"kind": "postgresql", "managed": True}, "slurm",
                       f"SLURM answers here (sinfo: {m.slurm_cpus} CPUs in the cluster): job arrays, a "
                       "managed PostgreSQL server run as a job")
    if m.postgres is not None and m.cores > 2:
        workers = min(m.cores - 1, MAX_LOCAL_WORKERS)  # a core left for the driver and the server
        return Backend({"kind": "postgresql", "managed": True}, {"kind": "local", "workers": workers},
                       f"no SLURM (sinfo does not answer); PostgreSQL in {m.postgres} and {m.cores} cores: "
                       f"{workers} local workers on a managed server")
    why = "no PostgreSQL server binaries" if m.postgres is None else f"{m.cores} cores"
    return Backend("sqlite", "local", f"no SLURM (sinfo does not answer), {why}: SQLite, one batch at a time")


@dataclass(frozen=True)
class Address:
    """ultrack's `[data] address` (user:password@host:port/dbname?options) without its password."""

    user: str | None
    host: str | None
    port: int | None
    dbname: str | None
    had_password: bool


def parse_address(address: str) -> Address:
    u = urllib.parse.urlsplit("postgresql://" + address)
    query = urllib.parse.parse_qs(u.query)
    had = bool(u.password) or "password" in {k.lower() for k in query}
    try:
        port = u.port
    except ValueError:
        port = None
    return Address(u.username, u.hostname, port, u.path.lstrip("/") or None, had)


@dataclass(frozen=True)
class DataPaths:
    foreground: Path | None
    contours: Path | None
    labels: tuple[Path, ...]
    ground_truth: Path | None

    def check(self) -> None:
        if self.labels and (self.foreground or self.contours):
            raise BadInput("init: give --foreground and --contours, or --labels, not both")
        if not self.labels and not (self.foreground and self.contours):
            raise BadInput("init: give --foreground and --contours (ultrack's inputs), or --labels "
                           "(label movies, one or more)")


def _rel(p: Path, folder: Path) -> str:
    """Relative to the sweep file's folder when inside it (the file moves with its data), absolute
    otherwise (the file still works copied elsewhere, e.g. to a cluster's scratch)."""
    target = Path(os.path.abspath(p))
    rel = os.path.relpath(target, os.path.abspath(folder))
    return str(target) if rel.startswith("..") else rel


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
    return text.strip().removesuffix("\n...")


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ")


def _block(value: Any, indent: int) -> list[str]:
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=100)
    return [" " * indent + line for line in text.splitlines()]


def _name(out: Path, name: str | None) -> str:
    return name if name is not None else (re.sub(r"[^A-Za-z0-9_-]", "-", out.stem)[:64] or "sweep")


EXECUTION = {"segmentation": ("n_workers",), "linking": ("n_workers",)}  # gridsearch sets these
ALSO_WORTH = ("segmentation.threshold", "tracking.division_weight", "tracking.disappear_weight")


@dataclass(frozen=True)
class Draft:
    """Everything the sweep file says, before it is written."""

    out: Path
    name: str
    config: Path | None
    own: dict[str, Any]  # the config's sections as written, without [data]
    sections: dict[str, dict[str, Any]]  # the same validated: ultrack's defaults filled in
    data: DataPaths
    backend: Backend
    address: Address | None

    def render(self) -> str:
        """The sweep file's text, every choice commented."""
        src = str(self.config) if self.config else "ultrack's defaults (no --config)"
        head = [f"# Sweep file written by `gridsearch init` from {src}.",
                f"# Check the paths and the grid, then: gridsearch plan {self.out}",
                f"name: {self.name}",
                f"workdir: runs/{self.name}    # relative to this file: results, logs, databases"]
        lines = head + self._data() + self._config(src) + self._grid() + self._backend()
        return "\n".join(lines) + "\n"

    def _data(self) -> list[str]:
        folder, data = self.out.parent, self.data
        lines = ["data:"]
        if data.labels:
            lines += ["  # instance label movies (Cellpose, StarDist ...): gridsearch turns them once",
                      "  # into ultrack's foreground and contours (labels_to_contours), in workdir/inputs",
                      f"  labels: {_flow([_rel(p, folder) for p in data.labels])}"]
        else:
            assert data.foreground and data.contours
            lines += [f"  foreground: {_flow(_rel(data.foreground, folder))}",
                      f"  contours: {_flow(_rel(data.contours, folder))}"]
        if data.ground_truth:
            gt = _flow(_rel(data.ground_truth, folder))
            lines.append(f"  ground_truth: {gt}   # CTC TRA folder: trials scored, ranked by TRA")
        else:
            lines.append("  # ground_truth: gt/   # a CTC TRA folder: trials scored (TRA, DET, LNK, CHOTA)")
        return lines

    def _config(self, src: str) -> list[str]:
        kept = {s: {k: v for k, v in values.items() if k not in EXECUTION.get(s, ())}
                for s, values in self.own.items() if isinstance(values, dict)}
        kept = {s: v for s, v in kept.items() if v}
        return [f"# Base ultrack config: the sections of {src} as written, without its [data]",
                "# section (gridsearch decides where each database lives) nor n_workers (frames per",
                "# batch: gridsearch sets it). Keys not given take ultrack's defaults.",
                *(["config:", *_block(kept, 2)] if kept else ["config: {}"])]

    def _grid(self) -> list[str]:
        grid = suggest_grid(self.sections)
        lines = [f"# {len(grid)} parameters that change results most, around the config's values", "grid:"]
        for g in grid:
            lines += [*_comment(f"{g.key}: {g.why}. Values: {g.how}.", "  "), f"  {g.key}: {_flow(g.values)}"]
        current = ", ".join(f"{k} ({self.sections[k.split('.')[0]][k.split('.')[1]]})" for k in ALSO_WORTH)
        return [*lines, *_comment(f"also worth sweeping (current value): {current}", "  ")]

    def _backend(self) -> list[str]:
        b, a = self.backend, self.address
        lines = [*_comment(f"Detected: {b.detected}."), f"database: {_flow(b.database)}"]
        if a is not None and a.host:
            server = {"kind": "postgresql", "host": a.host, "port": a.port or 5432, "user": a.user,
                      "dbname": a.dbname}
            lines += ["# or the server of the config's [data] address (its password is not copied: set "
                      "ULTRACK_DB_PW):",
                      f"# database: {_flow({k: v for k, v in server.items() if v is not None})}"]
        if b.executor != "slurm":
            return [*lines, f"executor: {_flow(b.executor)}"]
        from gridsearch.slurm.gateway import DEFAULT_RESOURCES

        lines += ["executor:", "  kind: slurm",
                  "  # partition: short                 # sbatch's default partition when unset",
                  "  # account: mylab",
                  '  # setup: ["module load python"]   # lines each job runs first',
                  "  stages:                            # per task: adjust to your movie's frame size"]
        return lines + [f'    {what}: {{cpus: {r.cpus}, mem: {r.mem}, time: "{r.time}"}}'
                        for what, r in DEFAULT_RESOURCES.items()]


@dataclass(frozen=True)
class Written:
    path: Path
    trials: int
    notices: list[str]


def write_sweep(out: Path, *, config: Path | None, data: DataPaths, name: str | None, force: bool,
                machine: Machine) -> Written:
    """Write the sweep file at `out` once it loads as `plan` loads it; refuse to overwrite one."""
    data.check()
    if out.exists() and not force:
        raise BadInput(f"init: {out} exists; pass --force to overwrite it")
    raw = read_config_toml(config, "init: --config: ") if config else {}
    notices = []
    address = None
    data_section = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if data_section.get("address"):
        address = parse_address(str(data_section["address"]))
        if address.had_password:
            who = " ".join(x for x in (f"user {address.user}" if address.user else "",
                                       f"on {address.host}" if address.host else "") if x)
            notices.append(f"dropped the password of {config}'s [data] address ({who}): gridsearch never "
                           "writes one; give it in ULTRACK_DB_PW when the sweep runs")
    own, sections = base_config(raw, f"init: {config}: ")
    backend = choose_backend(machine)
    notices.append(f"detected: {backend.detected}")
    text = Draft(out, _name(out, name), config, own, sections, data, backend, address).render()
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    try:
        with atomic_path(out) as tmp:
            tmp.write_text(text)
            try:
                sweep = load(tmp)
            except SpecError as e:
                raise SpecError(f"init: {str(e).replace(str(tmp), str(out))}") from None
    except BaseException:
        for d in made:  # nothing created when refused
            shutil.rmtree(d, ignore_errors=True)
        raise
    return Written(out, len(sweep.trials), notices)
