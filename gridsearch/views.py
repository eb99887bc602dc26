"""What the read-only commands show (status, results, best, plot, dashboard), computed from the
ledger without starting anything a running sweep owns. The CLI only prints these."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from rich.table import Table

from gridsearch import costs, metrics, results, screen
from gridsearch.core.errors import BadInput, GridsearchError
from gridsearch.engine import existing_ledger, plan_for
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan
from gridsearch.spec import CTC_METRICS, Sweep
from gridsearch.stages import Stage
from gridsearch.workspace import Workspace

# On screen after the trial, its swept values, its state and the objective (without --all).
_SCREEN_FIGURES = (*CTC_METRICS, "tracks", "divisions", "mean_track_length")


class NoState(GridsearchError):
    """A view of a sweep that has not run yet."""


@contextlib.contextmanager
def ledger_of(sweep: Sweep) -> Iterator[Ledger]:
    with existing_ledger(sweep) as led:
        if led is None:
            raise NoState(f"{sweep.workdir}: no sweep state yet; run `gridsearch sweep {sweep.path}` first")
        yield led


def results_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """The results table as rows: `results` and `best` on screen need no pandas (0.6 s)."""
    with ledger_of(sweep) as led:
        return results.rows(sweep, led)


def estimate(sweep: Sweep, led: Ledger | None, plan: Plan) -> costs.Estimate | None:
    """What the plan's pending stage runs will cost, from this sweep's measured batches; None until
    every stage they need is measured (costs.MIN_BATCHES)."""
    if led is None:
        return None
    return costs.branch_estimate(plan, costs.stage_costs(led.measured_batches()), costs.workload(sweep),
                                 sweep.parallel)


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


def _no_such_column(option: str, name: str, columns: Sequence[str]) -> BadInput:
    return BadInput(f"{option} {name}: no such column; columns are: {', '.join(columns)}")


def objective_column(columns: Sequence[str], sweep: Sweep, objective: str | None) -> str:
    """What `best` and `plot` rank by. A --objective the table can never hold is bad input; a
    figure or metric no trial has produced yet is left to the caller ("nothing completed yet")."""
    if objective is None or objective in columns:
        return objective or sweep.objective
    gt = sweep.file.data.ground_truth
    scored = [*metrics.available_metrics(gt), *metrics.AOGM_KEYS, "Valid"] if gt else []
    if objective not in [*results.FIGURES, *scored]:
        raise _no_such_column("--objective", objective, columns)
    return objective


def sorted_rows(rows: list[dict[str, Any]], sweep: Sweep, sort_by: str | None,
                top: int | None) -> list[dict[str, Any]]:
    """--sort (descending for the objective, ascending otherwise; empty values last), then --top.
    --top alone keeps the best: it sorts by the objective, when trials have one."""
    if top and not sort_by and sweep.objective in results.columns(rows):
        sort_by = sweep.objective
    if sort_by:
        if sort_by not in (columns := results.columns(rows)):
            raise _no_such_column("--sort", sort_by, columns)
        present = [r for r in rows if _cell(r.get(sort_by)) != ""]
        empty = [r for r in rows if _cell(r.get(sort_by)) == ""]
        try:
            present.sort(key=lambda r: r[sort_by], reverse=sort_by in ("objective", sweep.objective))
        except TypeError:  # numbers and text in one column: sort as text
            present.sort(key=lambda r: str(r[sort_by]))
        rows = present + empty
    return rows[:top] if top else rows


def screen_table(rows: list[dict[str, Any]], sweep: Sweep, width: int,
                 every: bool = False) -> tuple[Table, list[str]]:
    """`results` on screen: the trial, its swept values by their short names, its state, the
    objective and a few figures (`every`: then all other columns), as many whole columns as fit
    in `width`; and the lines that say what was left out and how to see it."""
    columns = results.columns(rows)
    first = [c for c in dict.fromkeys(["trial", *sweep.grid_keys, "state", sweep.objective,
                                       *_SCREEN_FIGURES]) if c in columns]
    rest = [c for c in columns if c not in first]
    names = screen.short_names(sweep.grid_keys, taken=[c for c in columns if c not in sweep.grid_keys])
    order = first + rest if every else first
    swept = set(sweep.grid_keys)  # as written in the sweep file; figures to 3 decimals
    cells = [{c: _cell(r.get(c), c not in swept) for c in order} for r in rows]
    fitted = screen.fit(order, cells, width, names)
    notes = [f"objective: {sweep.objective} (higher is better)"]
    if line := fitted.left_out_line():
        notes.append(line)
    n = len(rest)
    more = f"{n} more column{'' if n == 1 else 's'} with --all; " if rest and not every else ""
    notes.append(f"{more}every column in a file: -o FILE")
    return fitted.table, notes


def plan_table(rows: list[dict[str, Any]], sweep: Sweep, width: int) -> tuple[Table, list[str]]:
    """`plan` on screen: the trials in run order with their swept values by short names and where
    each starts, as many whole columns as fit in `width` (the rest: --json)."""
    columns = ["#", "trial", *sweep.grid_keys, "first_stage"]
    names = screen.short_names(sweep.grid_keys, taken=["#", "trial", "first_stage"])
    cells = [{"#": str(i), "trial": row["trial"], **{k: str(row["params"][k]) for k in sweep.grid_keys},
              "first_stage": "done" if row["done"] else row["first_stage"]} for i, row in enumerate(rows, 1)]
    fitted = screen.fit(columns, cells, width, names)
    line = fitted.left_out_line()
    return fitted.table, [f"{line}; every column: --json"] if line else []


def _cell(v: Any, rounded: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.3f}" if rounded and isinstance(v, float) else str(v)


def branches(sweep: Sweep, led: Ledger | None, plan: Plan, nodes: int | None = None,
             cpus_per_node: int = 1) -> dict[str, Any]:
    """How the branches of the plan overlap with `parallel` databases: forks, how many stage runs
    at once, and (once every stage is measured) the simulated makespan, on `nodes` nodes if given
    (SLURM's max_parallel still caps the tasks at once)."""
    from gridsearch.branches import DEFAULT_COST, simulate

    k = sweep.parallel
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
    doc.update(forks=sim.forks, runs_at_once=max(itertools.accumulate(d for _, d in edges)),
               tree=_tree(sim.runs))
    est = costs.branch_estimate(plan, measured, work, k)
    if est is not None:
        doc.update(makespan_s=round(est.wall_s, 1), parallelism=work.parallelism)
    return doc


def _tree(runs: list[Any]) -> list[dict[str, Any]]:
    """The stage runs as the tree the branches form, depth first: what each runs (the swept
    values of its stage), on which database, and its step: runs of one step start together."""
    by_node = {id(r.node): r for r in runs}
    steps = {t: i for i, t in enumerate(sorted({r.start for r in runs}), 1)}
    out: list[dict[str, Any]] = []

    def walk(node: Any, depth: int) -> None:
        run = by_node.get(id(node))
        if run is None:
            return
        prefix = node.stage.section + "."
        out.append({"depth": depth, "stage": node.stage.label, "database": run.db, "step": steps[run.start],
                    "params": {k: v for k, v in node.owner.params.items() if k.startswith(prefix)}})
        for child in node.children:
            walk(child, depth + 1)

    children = {id(c) for r in runs for c in r.node.children}
    for root in [r.node for r in runs if id(r.node) not in children]:
        walk(root, 0)
    return out


def tree_lines(doc: dict[str, Any], limit: int = 40) -> list[str]:
    """`plan`'s picture of the branches: one line per stage run, indented under its parent."""
    tree = doc.get("tree") or []
    if doc.get("parallel", 1) <= 1 or not tree:
        return []
    lines = ["the branches: stage run  (database, step: runs of one step start together)"]
    for n in tree[:limit]:
        what = " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in n["params"].items()) or "(base config)"
        lines.append(f"{'  ' * n['depth']}{'└ ' if n['depth'] else ''}{n['stage']} {what}  "
                     f"({n['database']}, step {n['step']})")
    if len(tree) > limit:
        lines.append(f"... and {len(tree) - limit:,} more stage runs (all of them: --json)")
    return lines


def branches_line(doc: dict[str, Any], nodes: int | None) -> str:
    where = f" on {nodes} node(s), {doc.get('parallelism')} tasks at once" if nodes else ""
    line = (f"branches: up to {doc['parallel']} database(s) at once, {doc['forks']} fork(s), "
            f"up to {doc['runs_at_once']} stage run(s) at the same time")
    if doc["makespan_s"] is not None:
        line += f"; simulated makespan{where}: {costs.duration(doc['makespan_s'])}"
    elif nodes:
        line += "; no makespan until every stage has measured batches (run a few trials first)"
    return line
