"""Durable sweep state: the optuna study (trials) plus our own tables (database contents, stage runs).

Every write is one transaction ordered so that a kill at any instant leaves a state the next run reads
exactly: a stage's fingerprint is erased before its database is touched and written back only after
its last batch committed, so a half-done stage always reads as "must be cleared and re-run"."""

from __future__ import annotations

import functools
import json
import math
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from gridsearch.schema import batch_t, db_state_t, ensure, meta_t, stage_run_t
from gridsearch.spec import Trial
from gridsearch.stages import Stage, start_label

if TYPE_CHECKING:
    import optuna

_FP_COL = {Stage.SEGMENT: "segment_fp", Stage.LINK: "link_fp", Stage.SOLVE: "solve_fp"}


class LedgerError(RuntimeError):
    """An invariant of the ledger would break: a bug, never bad input."""


@dataclass(frozen=True)
class TrialRecord:
    """A trial as the study holds it (the latest attempt for its key)."""

    number: int
    key: str
    state: str  # RUNNING | COMPLETE | FAIL
    params: dict[str, Any]
    attrs: dict[str, Any]
    value: float | None
    started: Any
    finished: Any


class Ledger:
    def __init__(self, url: str, study_name: str, engine_kwargs: dict[str, Any] | None = None,
                 *, read_only: bool = False) -> None:
        """read_only: a view, which must not upgrade the schema under a running driver."""
        kw = dict(engine_kwargs or {})
        self.url = url
        self.engine = sa.create_engine(url, **kw)
        if url.startswith("sqlite"):
            # One driver writes; the status command may read concurrently: wait instead of failing.
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        ensure(self.engine, migrate=not read_only, where=study_name)
        self.study_name, self._engine_kwargs = study_name, kw
        self._records: dict[str, TrialRecord] | None = None
        if not read_only:
            self.study  # noqa: B018  the driver creates the study (and optuna's tables) up front

    @functools.cached_property
    def storage(self) -> optuna.storages.RDBStorage:
        """Opened on first use: a view reads optuna's tables with SQL (records), and importing and
        opening optuna costs about 0.5 s of every `status`."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.storages.RDBStorage(self.url, engine_kwargs=self._engine_kwargs or None)

    @functools.cached_property
    def study(self) -> optuna.Study:
        import optuna

        return optuna.create_study(storage=self.storage, study_name=self.study_name, direction="maximize",
                                   load_if_exists=True)

    def close(self) -> None:
        self.engine.dispose()
        if "storage" in self.__dict__:
            self.storage.remove_session()
            self.storage.engine.dispose()

    # ---- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(meta_t.c.value).where(meta_t.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self.engine.begin() as c:
            c.execute(meta_t.delete().where(meta_t.c.key == key))
            c.execute(meta_t.insert().values(key=key, value=value))

    # ---- what each ultrack database holds -------------------------------------------------------
    def held(self, database: str) -> dict[Stage, str | None]:
        with self.engine.connect() as c:
            row = c.execute(sa.select(db_state_t).where(db_state_t.c.database == database)).first()
        if row is None:
            return {s: None for s in Stage}
        return {s: getattr(row, _FP_COL[s]) for s in Stage}

    def _set_held(self, c: sa.Connection, database: str, values: Mapping[str, str | None]) -> None:
        exists = c.execute(
            sa.select(db_state_t.c.database).where(db_state_t.c.database == database)
        ).first()
        if exists:
            c.execute(
                db_state_t.update()
                .where(db_state_t.c.database == database)
                .values(**values, updated_at=time.time())
            )
        else:
            c.execute(db_state_t.insert().values(database=database, **values, updated_at=time.time()))

    def invalidate(self, database: str, from_stage: Stage) -> None:
        """Before the database is cleared or written: forget every result from `from_stage` on."""
        with self.engine.begin() as c:
            self._set_held(c, database, {_FP_COL[s]: None for s in Stage if s >= from_stage})

    def fork_state(self, src: str, dst: str) -> None:
        """After Backend.fork(src, dst) succeeded, never before: ``dst`` holds what ``src`` holds
        (nothing, when ``src`` has no row). One transaction: a fork is trusted entirely or not."""
        with self.engine.begin() as c:
            row = c.execute(sa.select(db_state_t).where(db_state_t.c.database == src)).first()
            self._set_held(c, dst, {col: None if row is None else getattr(row, col)
                                    for col in _FP_COL.values()})

    def drop_state(self, name: str) -> None:
        """Before its database is dropped: a database without a row is an orphan, never trusted."""
        with self.engine.begin() as c:
            c.execute(db_state_t.delete().where(db_state_t.c.database == name))

    def databases(self) -> list[str]:
        """Databases the ledger has a row for (main and forks)."""
        with self.engine.connect() as c:
            return list(c.execute(sa.select(db_state_t.c.database).order_by(db_state_t.c.database)).scalars())

    # ---- stage runs ----------------------------------------------------------------------------
    def open_stage_runs(self, database: str, trial_key: str, fingerprints: Mapping[Stage, str],
                        stages: list[Stage], adopt: Mapping[Stage, int]) -> dict[Stage, int]:
        """One run per stage, created before any batch is submitted so that every worker knows the
        run it acknowledges. ``adopt``: runs of a killed driver whose jobs still run (kept, with
        their acknowledgements)."""
        now, host = time.time(), socket.gethostname()
        runs: dict[Stage, int] = {}
        with self.engine.begin() as c:
            self._set_held(c, database, {_FP_COL[s]: None for s in stages})
            for stage in stages:
                if stage in adopt:
                    c.execute(stage_run_t.update().where(stage_run_t.c.id == adopt[stage])
                              .values(state="queued", finished_at=None, host=host))
                    runs[stage] = adopt[stage]
                    continue
                res = c.execute(stage_run_t.insert().values(
                    trial_key=trial_key, database=database, stage=stage.label,
                    fingerprint=fingerprints[stage], state="queued", batches_total=0,
                    started_at=now, host=host))
                runs[stage] = int(res.inserted_primary_key[0])
        return runs

    def start_stage(self, run_id: int, batches: int) -> None:
        """An adopted run keeps its start time: its wall time covers the jobs it adopted."""
        with self.engine.begin() as c:
            started = c.execute(sa.select(sa.func.count()).select_from(batch_t)
                                .where(batch_t.c.run_id == run_id)).scalar_one() > 0
            values: dict[str, Any] = {"state": "running", "batches_total": batches}
            if not started:
                values["started_at"] = time.time()
            c.execute(stage_run_t.update().where(stage_run_t.c.id == run_id).values(**values))

    def acked(self, run_ids: Iterable[int]) -> dict[int, set[int]]:
        """Batches whose workers acknowledged them, per run: the only proof a batch is complete."""
        ids = sorted(set(run_ids))
        out: dict[int, set[int]] = {r: set() for r in ids}
        if not ids:
            return out
        with self.engine.connect() as c:
            for run_id, batch in c.execute(sa.select(batch_t.c.run_id, batch_t.c.batch)
                                           .where(batch_t.c.run_id.in_(ids))):
                out[run_id].add(batch)
        return out

    def finish_stage(self, run_id: int, database: str, stage: Stage, fp: str) -> float:
        """The stage's result becomes trusted in the same transaction that records it done, and
        only when every batch was acknowledged by its worker."""
        now = time.time()
        with self.engine.begin() as c:
            started, total = c.execute(
                sa.select(stage_run_t.c.started_at, stage_run_t.c.batches_total)
                .where(stage_run_t.c.id == run_id)
            ).one()
            acked = c.execute(sa.select(sa.func.count()).select_from(batch_t)
                              .where(batch_t.c.run_id == run_id)).scalar_one()
            if total == 0 or acked < total:
                raise LedgerError(f"{stage.label} run {run_id}: {acked} of {total} batches acknowledged; "
                                  "refusing to trust it")
            wall = now - started
            c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.id == run_id)
                .values(state="done", finished_at=now, wall_s=wall)
            )
            self._set_held(c, database, {_FP_COL[stage]: fp})
        return wall

    def fail_stage(self, run_id: int, error: str) -> None:
        """A started run that did not finish; its acknowledged batches stay on record."""
        with self.engine.begin() as c:
            c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.id == run_id, stage_run_t.c.state == "running")
                .values(state="failed", finished_at=time.time(), error=error[:4000])
            )

    def abandon_queued(self, run_ids: Iterable[int]) -> None:
        """Runs opened for stages that never started (an earlier stage failed)."""
        with self.engine.begin() as c:
            c.execute(stage_run_t.update().where(stage_run_t.c.id.in_(list(run_ids)),
                                                 stage_run_t.c.state == "queued")
                      .values(state="abandoned", finished_at=time.time()))

    def recover(self) -> int:
        """Called with the sweep lock held: a 'running' run belongs to a driver that died; a
        'queued' one never started. Returns how many were interrupted."""
        now = time.time()
        with self.engine.begin() as c:
            c.execute(stage_run_t.update().where(stage_run_t.c.state == "queued")
                      .values(state="abandoned", finished_at=now))
            res = c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.state == "running")
                .values(state="interrupted", finished_at=now)
            )
            return res.rowcount or 0

    def stage_runs(self) -> list[dict[str, Any]]:
        """Every run, with ``batches_done``: how many of its batches their workers acknowledged."""
        done = (sa.select(sa.func.count()).select_from(batch_t)
                .where(batch_t.c.run_id == stage_run_t.c.id).scalar_subquery().label("batches_done"))
        with self.engine.connect() as c:
            rows = c.execute(sa.select(stage_run_t, done).order_by(stage_run_t.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def run_databases(self, run_ids: Iterable[int]) -> dict[int, str]:
        """Which database each stage run wrote to (a re-attached array must keep writing there)."""
        ids = list(run_ids)
        with self.engine.connect() as c:
            rows = c.execute(sa.select(stage_run_t.c.id, stage_run_t.c.database)
                             .where(stage_run_t.c.id.in_(ids))).all()
        return {int(i): str(d) for i, d in rows}

    def measured_batches(self) -> list[dict[str, Any]]:
        """Every acknowledged batch whose worker measured it (schema v3 on), with its stage: what
        the cost model (gridsearch.costs) is built from. Older acks know no frames: left out."""
        cols = [stage_run_t.c.stage, batch_t.c.wall_s, batch_t.c.cpu_s, batch_t.c.max_rss_mb,
                batch_t.c.frames, batch_t.c.startup_s, batch_t.c.paid_startup]
        q = (sa.select(*cols).join(stage_run_t, stage_run_t.c.id == batch_t.c.run_id)
             .where(batch_t.c.frames.is_not(None), batch_t.c.wall_s.is_not(None))
             .order_by(batch_t.c.finished_at))
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def stage_wall(self, trial_key: str) -> dict[Stage, float]:
        """Wall seconds of the stages this trial ran (the latest successful run of each)."""
        out: dict[Stage, float] = {}
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(stage_run_t.c.stage, stage_run_t.c.wall_s)
                .where(stage_run_t.c.trial_key == trial_key, stage_run_t.c.state == "done")
                .order_by(stage_run_t.c.id)
            ).all()
        for stage, wall in rows:
            out[Stage.parse(stage)] = wall
        return out

    # ---- trials (optuna) -------------------------------------------------------------------------
    def records(self) -> dict[str, TrialRecord]:
        """Latest attempt per trial key. Read once, then kept in step by this ledger's own writes
        (the sweep lock makes it the only writer): re-reading every trial per trial is quadratic,
        and optuna's reads are slow (trials_dataframe over 10,000 trials: 3.7 s)."""
        if self._records is None:
            self._records = self._read_records()
        return self._records

    def _read_records(self) -> dict[str, TrialRecord]:
        """What `_remember` makes of `study.get_trials()`, read with one query per table from
        optuna's tables: optuna builds a FrozenTrial per trial, with its params and distributions,
        in 8.5 s for 10,000 trials (tests/benchmarks/bench_results.py); this takes about 1 s. Compared
        with the optuna path in tests/test_sweep_sqlite.py."""
        attrs: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as c:
            sid = self._study_id(c)
            if sid is None:
                return {}
            trials = c.execute(
                sa.select(_trials.c.trial_id, _trials.c.number, _trials.c.state, _trials.c.datetime_start,
                          _trials.c.datetime_complete, _values.c.value, _values.c.value_type)
                .select_from(_trials.outerjoin(_values, sa.and_(_values.c.trial_id == _trials.c.trial_id,
                                                               _values.c.objective == 0)))
                .where(_trials.c.study_id == sid).order_by(_trials.c.number)
            ).all()
            rows = c.execute(
                sa.select(_attrs.c.trial_id, _attrs.c.key, _attrs.c.value_json)
                .join(_trials, _trials.c.trial_id == _attrs.c.trial_id).where(_trials.c.study_id == sid)
            ).all()
        # Each value is a JSON text: decoded as one array, in one call (150,000 calls took seconds).
        decoded = json.loads("[" + ",".join(r[2] for r in rows) + "]")
        for (tid, key, _), value in zip(rows, decoded, strict=True):
            attrs.setdefault(tid, {})[key] = value
        out: dict[str, TrialRecord] = {}
        for tid, number, state, started, finished, value, value_type in trials:
            own = attrs.get(tid, {})
            key = own.get("key")
            if key is None:
                continue
            state = getattr(state, "name", state)  # PostgreSQL: optuna's enum type
            out[key] = TrialRecord(
                number=number,
                key=key,
                state=state,
                params=json.loads(own.get("params_json", "{}")),
                attrs=own,
                value=_stored_value(value, value_type) if state == "COMPLETE" else None,
                started=started,
                finished=finished,
            )
        return out

    def _study_id(self, c: sa.Connection) -> int | None:
        """The study's id without opening optuna; None before the driver created it."""
        if "study" in self.__dict__:
            return self.study._study_id
        if not sa.inspect(c).has_table("studies"):
            return None
        name = _studies.c.study_name == self.study_name
        return c.execute(sa.select(_studies.c.study_id).where(name)).scalar()

    def _remember(self, ft: optuna.trial.FrozenTrial) -> None:
        key = ft.user_attrs.get("key")
        if key is None or self._records is None:
            return
        self._records[key] = TrialRecord(
            number=ft.number,
            key=key,
            state=ft.state.name,
            params=json.loads(ft.user_attrs.get("params_json", "{}")),
            attrs=dict(ft.user_attrs),
            value=ft.value if ft.state.name == "COMPLETE" else None,
            started=ft.datetime_start,
            finished=ft.datetime_complete,
        )

    def _refresh(self, trial_id: int) -> None:
        self.records()
        self._remember(self.storage.get_trial(trial_id))

    def finished_keys(self) -> set[str]:
        return {k for k, r in self.records().items() if r.state == "COMPLETE"}

    def start_trial(self, trial: Trial, first_stage: Stage | None, grid: Mapping[str, list[Any]]) -> int:
        """Reuse the trial a killed driver left RUNNING, so one key never has two live attempts."""
        rec = self.records().get(trial.key)
        if rec is not None and rec.state == "RUNNING":
            return rec.number
        import optuna

        params, dists = _optuna_params(trial.params, grid)
        ft = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params=params,
            distributions=dists,
            user_attrs={
                "key": trial.key,
                "grid_number": trial.number,
                "params_json": json.dumps(trial.params),
                "first_stage": start_label(first_stage),
            },
        )
        sid = self.study._study_id
        try:
            trial_id = self.storage.create_new_trial(sid, template_trial=ft)
        except ValueError:  # a categorical key whose choices grew: keep the params in user attrs only
            ft = optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING, user_attrs=ft.user_attrs
            )
            trial_id = self.storage.create_new_trial(sid, template_trial=ft)
        self._refresh(trial_id)
        return self.storage.get_trial_number_from_id(trial_id)

    def finish_trial(self, number: int, value: float, attrs: Mapping[str, Any]) -> None:
        trial_id = self._trial_id(number)
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial_id, k, v)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = float("-inf")
        self.study.tell(number, value)
        self._refresh(trial_id)

    def fail_trial(self, number: int, error: str) -> None:
        import optuna

        trial_id = self._trial_id(number)
        self.storage.set_trial_user_attr(trial_id, "error", error[:2000])
        self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        self._refresh(trial_id)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)


# optuna's own tables (optuna/storages/_rdb/models.py), only the columns `records` reads: declared
# here, not reflected, so a read costs no schema queries. Unqualified: the engine's search_path
# (an existing PostgreSQL server) names the sweep's schema.
_optuna_md = sa.MetaData()
_studies = sa.Table("studies", _optuna_md, sa.Column("study_id", sa.Integer, primary_key=True),
                    sa.Column("study_name", sa.String))
_trials = sa.Table("trials", _optuna_md, sa.Column("trial_id", sa.Integer, primary_key=True),
                   sa.Column("number", sa.Integer), sa.Column("study_id", sa.Integer),
                   sa.Column("state", sa.String), sa.Column("datetime_start", sa.DateTime),
                   sa.Column("datetime_complete", sa.DateTime))
_values = sa.Table("trial_values", _optuna_md, sa.Column("trial_value_id", sa.Integer, primary_key=True),
                   sa.Column("trial_id", sa.Integer), sa.Column("objective", sa.Integer),
                   sa.Column("value", sa.Float), sa.Column("value_type", sa.String))
_attrs = sa.Table("trial_user_attributes", _optuna_md,
                  sa.Column("trial_user_attribute_id", sa.Integer, primary_key=True),
                  sa.Column("trial_id", sa.Integer), sa.Column("key", sa.String),
                  sa.Column("value_json", sa.Text))


def _stored_value(value: float | None, value_type: Any) -> float | None:
    """optuna stores infinities as NULL with a type (TrialValueModel.stored_repr_to_value)."""
    kind = getattr(value_type, "name", value_type)
    if kind == "INF_POS":
        return float("inf")
    if kind == "INF_NEG":
        return float("-inf")
    return value


def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 30000")
    cur.close()


def _optuna_params(
    params: Mapping[str, Any], grid: Mapping[str, list[Any]]
) -> tuple[dict[str, Any], dict[str, optuna.distributions.BaseDistribution]]:
    """Numeric keys become ranges (which may grow with the grid); others categorical."""
    import optuna

    out: dict[str, Any] = {}
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, value in params.items():
        values = grid[key]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and all(isinstance(v, int) for v in values):
            dists[key] = optuna.distributions.IntDistribution(min(values), max(values))
        elif numeric:
            dists[key] = optuna.distributions.FloatDistribution(
                float(min(values)), float(max(values))
            )
            value = float(value)
        elif all(v is None or isinstance(v, str | bool | int | float) for v in values):
            dists[key] = optuna.distributions.CategoricalDistribution(tuple(values))
        else:
            continue
        out[key] = value
    return out, dists
