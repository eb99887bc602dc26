"""What the read-only commands show (status, results, best, plot, dashboard), computed from the
ledger without starting anything a running sweep owns. The CLI only prints these."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from gridsearch import costs, forecast, metrics, results, screen
from gridsearch.backends import Backend
from gridsearch.branches import MAIN, Simulation
from gridsearch.core.errors import BadInput, GridsearchError
from gridsearch.core.files import tree_bytes
from gridsearch.engine import existing_ledger, existing_state, plan_for
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan
from gridsearch.spec import CTC_METRICS, Sweep
from gridsearch.stages import Stage, start_label
from gridsearch.workspace import Workspace

if TYPE_CHECKING:
    from gridsearch.slurm.jobs import JobRow
    from gridsearch.slurm.parse import QueuedJob

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
    every stage they need is measured (costs.MIN_BATCHES), and when nothing is left to run (an
    estimate of nothing is no news)."""
    if led is None or not plan.pending:
        return None
    return costs.branch_estimate(plan, costs.stage_costs(led.measured_batches()), costs.workload(sweep),
                                 sweep.parallel)


def estimate_doc(est: costs.Estimate | None) -> dict[str, Any] | None:
    if est is None:
        return None
    return {"wall_s": round(est.wall_s, 1), "core_hours": round(est.core_hours, 6),
            "measured_batches": est.measured, "line": est.line()}


def status(sweep: Sweep) -> dict[str, Any]:
    """Trials by state, stage runs by stage and state, and what the driver is running now."""
    by_state: dict[str, int] = {"done": 0, "failed": 0, "running": 0, "pending": len(sweep.trials)}
    runs: dict[str, dict[str, int]] = {s.label: {} for s in Stage}
    running: list[dict[str, Any]] = []
    est: costs.Estimate | None = None
    left = len(sweep.trials)  # trials the next sweep would run (failed ones are retried)
    jobs: list[JobRow] | None = None
    with existing_ledger(sweep) as led:
        if led is not None:
            if sweep.executor.kind == "slurm":
                from gridsearch.slurm.jobs import JobStore

                jobs = JobStore(led.engine).rows()
            plan = plan_for(sweep, led)
            est, left = estimate(sweep, led, plan), len(plan.pending)
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
            "stage_runs": runs, "running": running if holder else [], "estimate": estimate_doc(est),
            "trials_left_to_run": left,
            "slurm": slurm_queue(sweep, jobs) if sweep.executor.kind == "slurm" else None}


def slurm_queue(sweep: Sweep, rows: Sequence[JobRow] | None) -> dict[str, Any]:
    """What SLURM has of the sweep, from one squeue call for its job names (the stage arrays, the
    server job, a driver job): per job, tasks running and pending and why they wait. A scheduler
    that does not answer is said in one line: the rest of the view stands without it."""
    from gridsearch.slurm import gateway, job_name, job_names, sweep_tag

    names = [*job_names(sweep), job_name(sweep, "driver")]
    try:
        queued = gateway.queued(names)
    except gateway.SlurmError as e:
        return {"error": str(e), "jobs": []}
    return {"error": None, "jobs": queue_jobs(sweep_tag(sweep), queued, rows)}


def queue_jobs(tag: str, queued: Sequence[QueuedJob],
               rows: Sequence[JobRow] | None) -> list[dict[str, Any]]:
    """squeue's jobs with what the ledger recorded of them (gs_slurm_job: the stage run's trial;
    `rows` None: no ledger yet), the driver and server jobs first, then the arrays in job id
    order. An array of the sweep's names no driver recorded is one `sweep` cancels before it
    clears anything."""
    by_id = {r.job_id: r for r in rows or []}  # the latest row of a job id wins
    out = []
    for q in queued:
        what = q.name[len(tag) + 1:] if q.name.startswith(tag + "-") else q.name
        row = by_id.get(q.job_id)
        out.append({"job_id": q.job_id, "name": q.name, "what": what, "array": q.array,
                    "trial_key": row.trial_key if row else None, "attempt": row.attempt if row else None,
                    "recorded": None if rows is None else row is not None, "running": q.running,
                    "pending": q.pending, "states": q.states, "reasons": q.reasons})
    return sorted(out, key=lambda j: j["what"] not in ("driver", "server"))


def queue_lines(doc: dict[str, Any] | None, width: int) -> list[str]:
    """`status`'s SLURM lines, each within `width` (a long one goes on, indented)."""
    if doc is None:
        return []
    if doc["error"]:
        return screen.wrap([f"slurm: scheduler not answering: {doc['error']}"], width, "", "  ")
    jobs = doc["jobs"]
    if not jobs:
        return ["slurm: nothing of this sweep is queued or running"]
    texts = []
    for j in jobs:
        head = f"{j['what']} {j['job_id']}"
        if j["trial_key"]:
            head += f", trial {j['trial_key']}" + (f", retry {j['attempt']}" if j["attempt"] else "")
        elif j["recorded"] is False and j["what"] in ("segment", "link", "solve"):
            head += ", recorded by no driver"
        states = dict(j["states"])
        if not j["array"]:
            counts = next(iter(states), "UNKNOWN").lower()
        else:
            order = sorted(states, key=lambda w: (w != "RUNNING", w != "PENDING"))
            counts = ", ".join(f"{states[w]} {w.lower()}" for w in order)
        reasons = j["reasons"]
        why = ""
        if len(reasons) == 1 and (not j["array"] or next(iter(reasons.values())) == j["pending"]):
            why = f" ({next(iter(reasons))})"
        elif reasons:  # a reason may hold commas (ReqNodeNotAvail, UnavailableNodes:...)
            why = " (" + "; ".join(f"{n} {r}" for r, n in reasons.items()) + ")"
        texts.append(f"{head}: {counts}{why}")
    n = len(jobs)
    return [f"slurm: {n} job{'' if n == 1 else 's'} of this sweep queued or running",
            *screen.wrap(texts, width)]


def forecast_lines(ahead: forecast.Forecast, width: int) -> list[str]:
    """`plan`'s summary block: a heading, then each line within `width`."""
    return [ahead.heading, *screen.wrap(ahead.texts(), width)]


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


def effective_parallel(sweep: Sweep) -> int:
    """Databases alive at once as the engine will have them: a schema on an existing server
    cannot be forked, and its branches run one after another."""
    db = sweep.database
    return 1 if db.kind == "postgresql" and not db.managed else sweep.parallel


def simulated(sweep: Sweep, led: Ledger | None, plan: Plan) -> Simulation:
    """The engine's branch decisions on a clock (unmeasured stage costs), from what the
    databases hold: the tree `plan` draws, its databases and the branches in flight."""
    from gridsearch.branches import DEFAULT_COST, simulate

    k = effective_parallel(sweep)
    held = None
    if led is not None:  # serial: main alone, as the serial driver runs
        held = {n: led.held(n) for n in (set(led.databases()) | {MAIN} if k > 1 else {MAIN})}
    return simulate([pt.trial for pt in plan.pending], k, DEFAULT_COST, held=held)


def branches(sweep: Sweep, led: Ledger | None, plan: Plan, nodes: int | None = None,
             cpus_per_node: int = 1, sim: Simulation | None = None) -> dict[str, Any]:
    """How the branches of the plan overlap with `parallel` databases: forks, how many stage runs
    at once, and (once every stage is measured) the simulated makespan, on `nodes` nodes if given
    (SLURM's max_parallel still caps the tasks at once)."""
    k = effective_parallel(sweep)
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
    sim = sim or simulated(sweep, led, plan)
    edges = sorted([(r.start, 1) for r in sim.runs] + [(r.end, -1) for r in sim.runs])
    doc.update(forks=sim.forks, runs_at_once=max(itertools.accumulate(d for _, d in edges), default=0),
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
        if depth == 0 and node.stage > Stage.SEGMENT:  # its parent a database holds: say which
            upstream = tuple(s.section + "." for s in Stage if s < node.stage)
            out[-1]["on"] = {k: v for k, v in node.owner.params.items() if k.startswith(upstream)}
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
        if n.get("on"):
            what += " on " + " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in n["on"].items())
        lines.append(f"{'  ' * n['depth']}{'└ ' if n['depth'] else ''}{n['stage']} {what}  "
                     f"({n['database']}, step {n['step']})")
    if len(tree) > limit:
        lines.append(f"... and {len(tree) - limit:,} more stage runs (all of them: --json)")
    return lines


def branches_line(doc: dict[str, Any], nodes: int | None) -> str:
    where = f" on {nodes} node(s), {doc.get('parallelism')} tasks at once" if nodes else ""
    if doc["runs_at_once"] == 0:
        line = "branches: no stage run left"
    elif doc["runs_at_once"] == 1 and not doc["forks"]:
        line = "branches: one stage run at a time, on one database"
    else:
        line = (f"branches: up to {doc['parallel']} database(s) at once, {doc['forks']} fork(s), "
                f"up to {doc['runs_at_once']} stage run(s) at the same time")
    if doc["makespan_s"] is not None:
        line += f"; simulated makespan{where}: {costs.duration(doc['makespan_s'])}"
    elif nodes:
        line += "; no makespan until every stage has measured batches (run a few trials first)"
    return line


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What `plan` shows: the trials in run order (the first `shown` on screen), stage runs against
    the naive count, the branch tree and what the rest of the plan asks for."""

    plan: Plan
    rows: list[dict[str, Any]]
    est: costs.Estimate | None
    fan: dict[str, Any]
    ahead: forecast.Forecast
    nodes: int | None

    def totals(self) -> dict[str, Any]:
        runs = self.plan.stage_runs()
        return {"stage_runs": {s.label: runs[s] for s in Stage}, "total_stage_runs": sum(runs.values()),
                "naive_stage_runs": self.plan.naive_runs}

    def doc(self) -> dict[str, Any]:
        return {"trials": self.rows, **self.totals(), "estimate": estimate_doc(self.est),
                "branches": self.fan, **self.ahead.doc()}

    def lines(self, width: int) -> list[str]:
        """The screen after the table: each trial's SLURM jobs, stage runs, branches, forecast."""
        out = [line for i, row in enumerate(self.rows, 1)
               for line in screen.wrap([f"{i:>3} {row['trial']} {j}" for j in row.get("jobs", [])], width,
                                       rest=" " * 19)]
        if len(self.plan.trials) > len(self.rows):
            out.append(f"... and {len(self.plan.trials) - len(self.rows):,} more trials (every one: --json)")
        t = self.totals()
        out.append("stage runs: " + ", ".join(f"{k} {v}" for k, v in t["stage_runs"].items())
                   + f" = {t['total_stage_runs']} (naive {t['naive_stage_runs']})")
        out += tree_lines(self.fan)
        out += screen.wrap([branches_line(self.fan, self.nodes)], width, first="", rest="  ")
        return out + forecast_lines(self.ahead, width)


def plan_report(sweep: Sweep, nodes: int | None, cpus_per_node: int, shown: int | None) -> PlanReport:
    """`shown`: trials listed (a big grid's first rows on screen: 100,000 rows help nobody)."""
    with existing_state(sweep) as state:
        led = state[1] if state is not None else None
        p = plan_for(sweep, led)
        est = estimate(sweep, led, p)
        sim = simulated(sweep, led, p)
        fan = branches(sweep, led, p, nodes, cpus_per_node, sim)
        ahead = plan_forecast(sweep, state, p, sim, est)
    listed = p.trials if shown is None else p.trials[:shown]
    jobs: dict[str, list[str]] = {}
    if sweep.executor.kind == "slurm":
        from gridsearch.slurm.describe import describe_jobs, one_each

        jobs = {pt.trial.key: describe_jobs(sweep, pt, ahead.per_task(pt.trial.key) or one_each)
                for pt in listed}
    rows = [{"trial": pt.trial.key, "number": pt.trial.number, "params": pt.trial.params,
             "first_stage": None if pt.done else start_label(pt.first_stage), "done": pt.done,
             **({"jobs": jobs[pt.trial.key]} if jobs else {})} for pt in listed]
    return PlanReport(p, rows, est, fan, ahead, nodes)


def plan_forecast(sweep: Sweep, state: tuple[Backend, Ledger] | None, plan: Plan, sim: Simulation,
                  est: costs.Estimate | None) -> forecast.Forecast:
    """`plan`'s summary before submitting, from what is measured: stage costs (right-sized
    tasks), the databases' sizes and the workdir; SLURM's MaxArraySize, and the partition's
    CPUs once tasks are right-sized (scontrol, sinfo: asked only then)."""
    from gridsearch.backends.slurm_server import reusable_server_job
    from gridsearch.slurm import describe, gateway

    backend, led = state if state is not None else (None, None)
    return forecast.build(
        sweep, plan, sim, led.databases() if led is not None else [], _disk(sweep, backend, led, plan), est,
        measured=costs.stage_costs(led.measured_batches()) if led is not None else {},
        limit=lambda: describe.max_array_size(), cpus=lambda: gateway.cluster_cpus(sweep.executor.partition),
        parallel_writers=sweep.database.kind == "postgresql",
        server_job=lambda: reusable_server_job(Workspace(sweep.workdir)))


def _disk(sweep: Sweep, backend: Backend | None, led: Ledger | None, plan: Plan) -> forecast.Disk:
    """Measured now: the databases that hold a segment result (an empty one says nothing of the
    size a database reaches), the workdir, a finished trial's exports."""
    import sqlalchemy as sa

    ws = Workspace(sweep.workdir)
    if backend is None or led is None:
        return forecast.Disk({}, 0, tree_bytes(ws.root) if ws.root.is_dir() else None)
    names = sorted(n for n in set(led.databases()) | {MAIN} if led.held(n).get(Stage.SEGMENT))
    try:
        sizes = backend.database_sizes(names, led.engine) if names else {}
    except sa.exc.SQLAlchemyError:  # not ours to measure (privileges): unknown, not a failed view
        sizes = {}
    inside = sum(sizes.values()) if sweep.database.kind == "sqlite" or sweep.database.managed else 0
    per_trial, trials = _exports(ws, led.finished_keys())
    return forecast.Disk(sizes, 0, tree_bytes(ws.root, skip=("trials",)) + trials, inside, per_trial,
                         len(plan.pending))


def _exports(ws: Workspace, finished: set[str], sample: int = 100) -> tuple[int | None, int]:
    """A finished trial's exports (the mean of up to `sample` of them, spread over the keys) and
    the bytes trials/ holds: walked whole up to 1,000 trial dirs, else from the sample (a trial's
    label images are a file per frame: 10,000 trials would be millions of stats)."""
    root = ws.root / "trials"
    keys = sorted(k for k in finished if ws.trial_dir(k).is_dir())
    per = None
    if keys:
        picked = keys[::max(1, len(keys) // sample)][:sample]
        per = round(statistics.mean(tree_bytes(ws.trial_dir(k)) for k in picked))
    try:
        with os.scandir(root) as entries:
            dirs = sum(1 for _ in entries)
    except OSError:
        return per, 0
    return per, tree_bytes(root) if dirs <= 1000 else (per or 0) * len(keys)
