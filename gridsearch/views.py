"""What the read-only commands show (status, results, best, plot, dashboard), computed from the
ledger without starting anything a running sweep owns. The CLI only prints these."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.table import Table

from gridsearch import costs, metrics, results
from gridsearch.core.errors import BadInput, GridsearchError
from gridsearch.engine import existing_ledger, plan_for
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan
from gridsearch.spec import Sweep
from gridsearch.stages import Stage
from gridsearch.workspace import Workspace

if TYPE_CHECKING:  # imported where a table is made: `status` and `plan` need none (0.6 s)
    import pandas as pd

# Columns left out of the on-screen table (all of them are in `results -o FILE`).
_OFF_SCREEN = {"number", "config", "tracks_csv", "started", "finished", "solver", "ultrack", "gridsearch",
               "optuna_trial", "error", "Valid", "appearances", "disappearances"}


class NoState(GridsearchError):
    """A view of a sweep that has not run yet."""


@contextlib.contextmanager
def ledger_of(sweep: Sweep) -> Iterator[Ledger]:
    with existing_ledger(sweep) as led:
        if led is None:
            raise NoState(f"{sweep.workdir}: no sweep state yet; run `gridsearch sweep {sweep.path}` first")
        yield led


def results_table(sweep: Sweep) -> pd.DataFrame:
    with ledger_of(sweep) as led:
        return results.table(sweep, led)


def estimate(sweep: Sweep, led: Ledger | None, plan: Plan) -> costs.Estimate | None:
    """What the plan's pending stage runs will cost, from this sweep's measured batches; None until
    every stage they need is measured (costs.MIN_BATCHES)."""
    if led is None:
        return None
    return costs.branch_estimate(plan, costs.stage_costs(led.measured_batches()), costs.workload(sweep),
                                 sweep.file.parallel)


def estimate_doc(est: costs.Estimate | None) -> dict[str, Any] | None:
    if est is None:
        return None
    return {"wall_s": round(est.wall_s, 1), "core_hours": round(est.core_hours, 3),
            "measured_batches": est.measured, "line": est.line()}


def status(sweep: Sweep) -> dict[str, Any]:
    """Trials by state, stage runs by stage and state, and what the driver is running now."""
    by_state: dict[str, int] = {"done": 0, "failed": 0, "running": 0, "pending": len(sweep.trials)}
    runs: dict[str, dict[str, int]] = {s.label: {} for s in Stage}
    running: list[dict[str, Any]] = []
    est: costs.Estimate | None = None
    with existing_ledger(sweep) as led:
        if led is not None:
            est = estimate(sweep, led, plan_for(sweep, led))
            recs = led.records()
            by_state = dict.fromkeys(by_state, 0)
            for t in sweep.trials:
                by_state[results.state(recs.get(t.key))] += 1
            for r in led.stage_runs():
                runs[r["stage"]][r["state"]] = runs[r["stage"]].get(r["state"], 0) + 1
                if r["state"] == "running":
                    running.append({k: r[k] for k in ("trial_key", "stage", "batches_done", "batches_total")})
    holder = Workspace(sweep.workdir).holder()
    return {"sweep": sweep.name, "workdir": str(sweep.workdir),
            "driver_pid": holder.pid if holder else None, "driver_host": holder.host if holder else None,
            "driver": holder.describe() if holder else None, "trials": by_state,
            "stage_runs": runs, "running": running if holder else [], "estimate": estimate_doc(est)}


def _no_such_column(option: str, name: str, df: pd.DataFrame) -> BadInput:
    return BadInput(f"{option} {name}: no such column; columns are: {', '.join(df.columns)}")


def objective_column(df: pd.DataFrame, sweep: Sweep, objective: str | None) -> str:
    """What `best` and `plot` rank by. A --objective the table can never hold is bad input; a
    figure or metric no trial has produced yet is left to the caller ("nothing completed yet")."""
    if objective is None or objective in df.columns:
        return objective or sweep.objective
    gt = sweep.file.data.ground_truth
    scored = [*metrics.available_metrics(gt), *metrics.AOGM_KEYS, "Valid"] if gt else []
    if objective not in [*results.FIGURES, *scored]:
        raise _no_such_column("--objective", objective, df)
    return objective


def sorted_rows(df: pd.DataFrame, sweep: Sweep, sort_by: str | None, top: int | None) -> pd.DataFrame:
    if sort_by:
        if sort_by not in df.columns:
            raise _no_such_column("--sort", sort_by, df)
        df = df.sort_values(sort_by, ascending=sort_by not in ("objective", sweep.objective),
                            na_position="last")
    return df.head(top) if top else df


def screen_table(df: pd.DataFrame, sweep: Sweep) -> Table:
    show = [c for c in df.columns if c not in _OFF_SCREEN and not c.startswith("AOGM")]
    t = Table(caption=f"objective: {sweep.objective}; every column: -o FILE")
    for col in show:
        # on screen, a swept key's section is implied by the stage columns
        t.add_column(col.split(".", 1)[1] if col in sweep.grid_keys else col, overflow="fold",
                     no_wrap=col == "trial")
    for _, row in df[show].iterrows():
        t.add_row(*(_cell(v) for v in row))
    return t


def _cell(v: Any) -> str:
    import pandas as pd

    with contextlib.suppress(TypeError, ValueError):
        if pd.isna(v):
            return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def branches(sweep: Sweep, led: Ledger | None, plan: Plan, nodes: int | None = None,
             cpus_per_node: int = 1) -> dict[str, Any]:
    """How the branches of the plan overlap with `parallel` databases: forks, how many stage runs
    at once, and (once every stage is measured) the simulated makespan, on `nodes` nodes if given
    (SLURM's max_parallel still caps the tasks at once)."""
    from gridsearch.branches import DEFAULT_COST, simulate

    k = sweep.file.parallel
    order = [pt.trial for pt in plan.pending]
    doc: dict[str, Any] = {"parallel": k, "forks": 0, "runs_at_once": 1 if order else 0, "makespan_s": None}
    if not order:
        return doc
    measured = costs.stage_costs(led.measured_batches()) if led is not None else {}
    work = costs.workload(sweep)
    if nodes is not None:
        slots = nodes * max(1, cpus_per_node)
        cap = sweep.executor.max_parallel if sweep.executor.kind == "slurm" else slots
        work = dataclasses.replace(work, parallelism=max(1, min(slots, cap)))
    sim = simulate(order, k, DEFAULT_COST)
    edges = sorted([(r.start, 1) for r in sim.runs] + [(r.end, -1) for r in sim.runs])
    doc.update(forks=sim.forks, runs_at_once=max(itertools.accumulate(d for _, d in edges)))
    est = costs.branch_estimate(plan, measured, work, k)
    if est is not None:
        doc.update(makespan_s=round(est.wall_s, 1), parallelism=work.parallelism)
    return doc


def branches_line(doc: dict[str, Any], nodes: int | None) -> str:
    where = f" on {nodes} node(s), {doc.get('parallelism')} tasks at once" if nodes else ""
    line = (f"branches: up to {doc['parallel']} database(s) at once, {doc['forks']} fork(s), "
            f"up to {doc['runs_at_once']} stage run(s) at the same time")
    if doc["makespan_s"] is not None:
        line += f"; simulated makespan{where}: {costs.duration(doc['makespan_s'])}"
    elif nodes:
        line += "; no makespan until every stage has measured batches (run a few trials first)"
    return line
