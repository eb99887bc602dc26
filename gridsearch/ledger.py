"""Durable sweep state: the optuna study (trials) plus our own tables (database contents, stage runs).

Every write is one transaction ordered so that a kill at any instant leaves a state the next run reads
exactly: a stage's fingerprint is erased before its database is touched and written back only after
its last batch committed, so a half-done stage always reads as "must be cleared and re-run"."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy as sa

from gridsearch.spec import Trial
from gridsearch.stages import Stage, start_label

optuna.logging.set_verbosity(optuna.logging.WARNING)

_md = sa.MetaData()

meta_t = sa.Table(
    "gs_meta",
    _md,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

db_state_t = sa.Table(
    "gs_db_state",
    _md,
    sa.Column("database", sa.String(128), primary_key=True),
    sa.Column("segment_fp", sa.String(64)),
    sa.Column("link_fp", sa.String(64)),
    sa.Column("solve_fp", sa.String(64)),
    sa.Column("updated_at", sa.Float, nullable=False),
)

stage_run_t = sa.Table(
    "gs_stage_run",
    _md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("trial_key", sa.String(32), nullable=False, index=True),
    sa.Column("database", sa.String(128), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    # running -> done | failed | interrupted
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("batches_total", sa.Integer, nullable=False, default=0),
    sa.Column("batches_done", sa.Integer, nullable=False, default=0),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("wall_s", sa.Float),
    sa.Column("host", sa.String(128)),
    sa.Column("error", sa.Text),
)

_FP_COL = {Stage.SEGMENT: "segment_fp", Stage.LINK: "link_fp", Stage.SOLVE: "solve_fp"}


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
    def __init__(self, url: str, study_name: str, engine_kwargs: dict[str, Any] | None = None) -> None:
        kw = dict(engine_kwargs or {})
        self.url = url
        self.engine = sa.create_engine(url, **kw)
        if url.startswith("sqlite"):
            # One driver writes; the status command may read concurrently: wait instead of failing.
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _md.create_all(self.engine)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kw or None)
        self.storage = storage
        self.study = optuna.create_study(
            storage=storage, study_name=study_name, direction="maximize", load_if_exists=True
        )
        self._records: dict[str, TrialRecord] | None = None

    def close(self) -> None:
        self.engine.dispose()
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

    # ---- stage runs ----------------------------------------------------------------------------
    def begin_stage(self, database: str, stage: Stage, trial_key: str, fp: str, batches: int) -> int:
        with self.engine.begin() as c:
            self._set_held(c, database, {_FP_COL[s]: None for s in Stage if s >= stage})
            res = c.execute(
                stage_run_t.insert().values(
                    trial_key=trial_key,
                    database=database,
                    stage=stage.label,
                    fingerprint=fp,
                    state="running",
                    batches_total=batches,
                    batches_done=0,
                    started_at=time.time(),
                    host=socket.gethostname(),
                )
            )
            return int(res.inserted_primary_key[0])

    def batch_done(self, run_id: int) -> None:
        with self.engine.begin() as c:
            c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.id == run_id)
                .values(batches_done=stage_run_t.c.batches_done + 1)
            )

    def finish_stage(self, run_id: int, database: str, stage: Stage, fp: str) -> float:
        """The stage's result becomes trusted in the same transaction that records it done."""
        now = time.time()
        with self.engine.begin() as c:
            started = c.execute(
                sa.select(stage_run_t.c.started_at).where(stage_run_t.c.id == run_id)
            ).scalar_one()
            wall = now - started
            c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.id == run_id)
                .values(state="done", finished_at=now, wall_s=wall)
            )
            self._set_held(c, database, {_FP_COL[stage]: fp})
        return wall

    def fail_stage(self, run_id: int, error: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.id == run_id)
                .values(state="failed", finished_at=time.time(), error=error[:4000])
            )

    def recover(self) -> int:
        """Called with the sweep lock held: any 'running' run belongs to a driver that died."""
        with self.engine.begin() as c:
            res = c.execute(
                stage_run_t.update()
                .where(stage_run_t.c.state == "running")
                .values(state="interrupted", finished_at=time.time())
            )
            return res.rowcount or 0

    def stage_runs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(stage_run_t).order_by(stage_run_t.c.id)).mappings().all()
        return [dict(r) for r in rows]

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
        and optuna's reads cost milliseconds per trial (DESIGN.md)."""
        if self._records is None:
            self._records = {}
            for ft in self.study.get_trials(deepcopy=False):
                self._remember(ft)
        return self._records

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
            value=ft.value if ft.state == optuna.trial.TrialState.COMPLETE else None,
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
        trial_id = self._trial_id(number)
        self.storage.set_trial_user_attr(trial_id, "error", error[:2000])
        self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        self._refresh(trial_id)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)


def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 30000")
    cur.close()


def _optuna_params(
    params: Mapping[str, Any], grid: Mapping[str, list[Any]]
) -> tuple[dict[str, Any], dict[str, optuna.distributions.BaseDistribution]]:
    """Numeric keys become ranges (which may grow with the grid); others categorical."""
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
