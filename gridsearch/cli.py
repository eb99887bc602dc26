"""The `gridsearch` command: parse, call the modules, print. No logic of its own."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from gridsearch.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    GridsearchError,
    first_line,
    one_line,
)
from gridsearch.spec import Sweep, load
from gridsearch.stages import Stage

T = TypeVar("T")
PLAN_ROWS = 30  # trials `plan` shows on screen; --json lists them all


def _console() -> Console:
    """Drawn on a duplicate of fd 1, so that ultrack's own output (sent to a log) cannot mix in."""
    try:
        return Console(file=os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1))
    except (OSError, ValueError, io.UnsupportedOperation):  # no real fd (embedded, test runners)
        return Console()


def fail(msg: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _load(spec: str) -> Sweep:
    """For every command but `sweep`, which validates with ultrack's models every time: an unchanged
    config validated by an earlier sweep is taken from its record, without importing ultrack."""
    return load(spec, trust=True)


class _Group(click.Group):
    """The one exit-code policy (gridsearch.core.errors) for every command: an expected failure
    ends in one line and its exit code, never a traceback; a bug in one line plus a crash log."""

    def invoke(self, ctx: click.Context) -> Any:
        import sqlalchemy.exc

        try:
            return super().invoke(ctx)
        except GridsearchError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:
            full = _disk_full(e)
            if full:
                fail(f"no space left on device ({full}); free some and run the same command to resume",
                     EXIT_FAILED)
            if isinstance(e, sqlalchemy.exc.OperationalError):
                cause = first_line(e.orig if e.orig is not None else e)
                sweeping = ctx.invoked_subcommand == "sweep"
                resume = "; the sweep stopped: run it again to resume" if sweeping else ""
                fail(f"database error: {cause}{resume}", EXIT_FAILED)
            _crash(e)


def _disk_full(e: BaseException) -> str | None:
    """A full disk surfaces wrapped (optuna, SQLAlchemy, sqlite3): find it in the cause chain."""
    import errno

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return str(cur.filename or cur.strerror)
        if "database or disk is full" in str(cur) or "No space left on device" in str(cur):
            return (str(cur).strip().splitlines() or [""])[0][:200]
        cur = cur.__cause__ or cur.__context__
    return None


def _crash(e: BaseException) -> None:
    """A bug: one line for the user, the traceback kept for the report."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="gridsearch-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(e)))
    fail(f"internal error: {one_line(e)} (traceback in {path})", EXIT_FAILED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gridsearch")
def main() -> None:
    """Parameter grid search for the Ultrack cell tracker."""


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="Your ultrack config.toml (else ultrack's).")
@click.option("--foreground", type=click.Path(), help="Foreground: zarr array, group/array or TIFF stack.")
@click.option("--contours", type=click.Path(), help="Contours: zarr array, group/array or TIFF stack.")
@click.option("--labels", multiple=True, type=click.Path(),
              help="Instance label movie instead of foreground + contours (repeat for several).")
@click.option("--ground-truth", type=click.Path(), help="CTC TRA folder: trials scored and ranked by TRA.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Sweep file to write (else NAME.yaml).")
@click.option("--name", help="Sweep name (default: the output file's name).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def init(config: str | None, foreground: str | None, contours: str | None, labels: tuple[str, ...],
         ground_truth: str | None, output: str | None, name: str | None, force: bool) -> None:
    """Write a commented sweep file from your config.toml and data: a grid around its values,
    the database and executor this machine can run."""
    from gridsearch.scaffold import DataPaths, probe_machine, write_sweep

    def path(p: str | None) -> Path | None:
        return Path(p) if p else None

    data = DataPaths(path(foreground), path(contours), tuple(Path(p) for p in labels), path(ground_truth))
    out = Path(output or f"{name or 'sweep'}.yaml")
    written = write_sweep(out, config=path(config), data=data, name=name, force=force,
                          machine=probe_machine())
    for line in written.notices:
        click.echo(line)
    click.echo(f"wrote {out}: {written.trials} trials; check it, then `gridsearch plan {out}`")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True,
              help="Archive earlier results and start over (base config or data changed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("--submit", is_flag=True,
              help="SLURM: run the driver as a job that resubmits itself before its time limit.")
@click.option("--in-job", "in_job", is_flag=True, hidden=True)  # the driver job's own call
def sweep(spec: str, restart: bool, quiet: bool, submit: bool, in_job: bool) -> None:
    """Run the sweep, or resume it where it stopped."""
    from gridsearch.engine import run_sweep
    from gridsearch.progress import Silent, for_console

    sw = load(spec)
    if submit:
        _submit_driver(sw, Path(spec), restart)
        return
    shown = for_console(_console())  # a live display, or timestamped lines in a job log
    reporter = Silent() if quiet else shown
    if in_job:
        out = _sweep_in_job(sw, Path(spec), lambda: run_sweep(sw, restart=restart, reporter=reporter),
                            shown.message)
    else:
        out = run_sweep(sw, restart=restart, reporter=reporter)
    shown.message(
        f"{out.completed} completed, {out.failed} failed, {out.skipped} already done; stage runs: "
        + ", ".join(f"{s.label} {out.stage_runs[s]}" for s in Stage)
        + f"; {out.wall_s:.1f} s"
    )
    sys.exit(EXIT_FAILED if out.failed else EXIT_OK)


def _submit_driver(sw: Sweep, spec: Path, restart: bool) -> None:
    from gridsearch.slurm import driver_job
    from gridsearch.slurm.gateway import DEFAULT_RESOURCES
    from gridsearch.workspace import Workspace

    if sw.executor.kind != "slurm":
        fail(f"{spec}: executor: --submit runs the driver as a SLURM job, for a sweep with executor: slurm")
    ws = Workspace(sw.workdir)
    live = driver_job.live_driver(sw)
    if live:
        fail(f"{sw.name}: its driver is already queued as SLURM job {live[0]} ({live[1]}); "
             f"follow it with `gridsearch status {spec}`", EXIT_FAILED)
    holder = ws.holder()
    if holder:
        fail(f"{sw.workdir}: a driver is running ({holder.describe()}); let it finish or stop it first",
             EXIT_FAILED)
    job = driver_job.submit(sw, spec, ws, restart=restart, notify=click.echo)
    res = sw.executor.stages.get(driver_job.DRIVER) or DEFAULT_RESOURCES[driver_job.DRIVER]
    click.echo(f"submitted the driver of {sw.name} as SLURM job {job} ({res.cpus} CPU, time limit "
               f"{res.time}; {driver_job.GRACE_S} s before it, the driver queues its successor)")
    click.echo(f"log: {driver_job.driver_log(ws, job)}")
    click.echo(f"follow: gridsearch status {spec}; stop: gridsearch cancel {spec}")


def _sweep_in_job(sw: Sweep, spec: Path, run: Callable[[], T], say: Callable[[str], None]) -> T:
    """The driver job's sweep: at the time limit's warning, queue the successor and end."""
    import signal

    from gridsearch.core.signals import terminate_as_exit
    from gridsearch.slurm import driver_job
    from gridsearch.workspace import Workspace

    ws = Workspace(sw.workdir)
    clock = driver_job.JobClock.start()
    with terminate_as_exit():  # from the job's first instant: a TERM always ends in carry_on
        try:
            driver_job.take_password(ws)
            driver_job.await_predecessor(ws)
            out = run()
        except SystemExit as e:
            if e.code != 128 + signal.SIGTERM:
                raise
            successor = driver_job.carry_on(sw, spec, ws, clock, say)
            sys.exit(EXIT_OK if successor else EXIT_INTERRUPTED)
    ws.driver_pgpass.unlink(missing_ok=True)  # the sweep is over: no job needs it
    return out


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--nodes", type=click.IntRange(min=1), help="simulate the makespan on this many nodes")
@click.option("--cpus-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="with --nodes: tasks each node runs at once")
def plan(spec: str, as_json: bool, nodes: int | None, cpus_per_node: int) -> None:
    """Dry run: the trials in run order, where each starts, stage runs against the naive count,
    how the branches overlap; then what the rest of the plan asks for: SLURM jobs and array tasks
    (or local batches), databases and disk, and the estimated time once costs are measured."""
    from gridsearch import views

    sw = _load(spec)
    report = views.plan_report(sw, nodes, cpus_per_node, None if as_json else PLAN_ROWS)
    if as_json:
        click.echo(json.dumps(report.doc(), indent=1))
        return
    c = _console()
    c.print(f"{sw.name}: {len(report.plan.trials)} trials")
    table, notes = views.plan_table(report.rows, sw, c.width)
    c.print(table)
    for line in notes:
        c.print(line, highlight=False)
    for line in report.lines(c.width):
        c.print(line, highlight=False, markup=False)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def status(spec: str, as_json: bool) -> None:
    """Trials by state, stage runs per stage (reruns included), what is running; on SLURM, the
    sweep's jobs in the queue: tasks running and pending, and why they wait."""
    from gridsearch import views

    sw = _load(spec)
    doc = views.status(sw)
    by_state, runs, holder = doc["trials"], doc["stage_runs"], doc["driver"]
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    c = _console()
    driver = f"driver running, {holder}" if holder else "no driver running"
    c.print(f"[bold]{sw.name}[/] in {sw.workdir}: {driver}", soft_wrap=True)  # the path whole, one line
    c.print("trials: " + ", ".join(f"{k} {v}" for k, v in by_state.items()))
    for stage, states in runs.items():
        c.print(f"  {stage}: " + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"))
    for r in doc["running"]:
        c.print(f"  running: trial {r['trial_key']} {r['stage']} "
                f"batch {r['batches_done']}/{r['batches_total']}")
    for line in views.queue_lines(doc["slurm"], c.width):
        c.print(line, highlight=False, markup=False)
    if doc["estimate"] is not None:
        c.print(doc["estimate"]["line"])
    elif doc["trials_left_to_run"] == 0:
        c.print("nothing left to run")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help=".csv, .parquet, .json or .md")
@click.option("--sort", "sort_by", help="Column to sort by (descending for the objective).")
@click.option("--top", type=int, help="Keep the first K rows (alone: the K best by the objective).")
@click.option("--all", "every", is_flag=True, help="On screen: every column that fits, beyond the main ones.")
def results(spec: str, output: str | None, sort_by: str | None, top: int | None, every: bool) -> None:
    """One row per trial: parameters, state, stage times, figures, metrics, provenance."""
    from gridsearch import results as res
    from gridsearch import views

    sw = _load(spec)
    rows = views.sorted_rows(views.results_rows(sw), sw, sort_by, top)
    if not output:
        c = _console()
        table, notes = views.screen_table(rows, sw, c.width, every)
        c.print(table)
        for line in notes:
            c.print(line, highlight=False)
        return
    try:
        res.write(res.frame(rows), Path(output))
    except ValueError as e:
        fail(str(e))
    click.echo(f"{len(rows)} rows written to {output}")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the config.toml here.")
@click.option("--objective", help="Rank by this column instead of the sweep's objective.")
def best(spec: str, output: str | None, objective: str | None) -> None:
    """The best trial's complete ultrack config, ready for the full dataset, and why it won."""
    from gridsearch import results as res
    from gridsearch import views
    from gridsearch.best import best_config_toml, best_trial, why

    sw = _load(spec)
    rows = views.results_rows(sw)
    obj = views.objective_column(res.columns(rows), sw, objective)
    try:
        row = best_trial(rows, obj)
        text = best_config_toml(row)
    except ValueError as e:
        fail(str(e), EXIT_FAILED)
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text)
    click.echo(why(row, rows, obj, sw.grid_keys), err=bool(not output))


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--objective", help="Plot this column instead of the sweep's objective.")
def plot(spec: str, out_dir: str, objective: str | None) -> None:
    """PNG plots: objective per parameter, heat maps, importance, stage times."""
    from gridsearch import results as res
    from gridsearch import views
    from gridsearch.plots import plot_all

    sw = _load(spec)
    with views.ledger_of(sw) as led:
        df = res.table(sw, led)
        obj = views.objective_column(list(df.columns), sw, objective)
        try:
            files = plot_all(df, led.study, sw.grid_keys, obj, Path(out_dir))
        except ValueError as e:  # no trial has the objective yet
            fail(str(e), EXIT_FAILED)
    for f in files:
        click.echo(str(f))


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def dashboard(spec: str, port: int, host: str) -> None:
    """optuna-dashboard on the sweep's study (pip install 'gridsearch[dashboard]')."""
    from gridsearch import views
    from gridsearch.dashboard import DashboardMissing, launch

    sw = _load(spec)
    with views.ledger_of(sw) as led:
        try:
            launch(led.storage, port=port, host=host)
        except DashboardMissing as e:
            fail(str(e), EXIT_FAILED)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
def cancel(spec: str) -> None:
    """SLURM: scancel every job of the sweep; the next `sweep` recovers from where it stopped."""
    from gridsearch.slurm.cancel import cancel_sweep
    from gridsearch.workspace import Workspace

    sw = _load(spec)
    if sw.executor.kind != "slurm":
        fail(f"{spec}: executor: cancel applies to SLURM sweeps; stop a local sweep with Ctrl-C")
    n = cancel_sweep(sw, Workspace(sw.workdir))
    click.echo(f"cancelled {n} job(s) of sweep {sw.name}")


@main.group()
def db() -> None:
    """A managed PostgreSQL server that outlives one sweep (several sweeps, inspection)."""


def _managed(spec: str) -> tuple[Sweep, Any]:
    from gridsearch.backends.postgres import managed_server
    from gridsearch.workspace import Workspace

    sw = _load(spec)
    if sw.database.kind != "postgresql" or not sw.database.managed:
        fail(f"{spec}: database: `gridsearch db` needs database: {{kind: postgresql, managed: true}}")
    return sw, managed_server(sw, Workspace(sw.workdir))


@db.command("start")
@click.argument("spec", type=click.Path(dir_okay=False))
def db_start(spec: str) -> None:
    """Start (initialising if needed) and leave running; sweeps on SPEC reuse it and leave it up."""
    from gridsearch.backends.postgres import keep_up

    sw, server = _managed(spec)
    started = keep_up(sw, server)
    click.echo(f"{'started' if started else 'already running'}: {server.host}:{server.port} "
               f"(data in {server.data_dir})")


@db.command("stop")
@click.argument("spec", type=click.Path(dir_okay=False))
def db_stop(spec: str) -> None:
    """Stop the sweep's managed server (refused while a sweep runs on it)."""
    from gridsearch.workspace import Workspace

    sw, server = _managed(spec)
    holder = Workspace(sw.workdir).holder()
    if holder:
        fail(f"{sw.workdir}: a sweep is running on this server ({holder.describe()}); stop it first",
             EXIT_FAILED)
    click.echo("stopped" if server.stop() else "not running")


@db.command("status")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def db_status(spec: str, as_json: bool) -> None:
    """Host, port, databases with their size, open connections."""
    _, server = _managed(spec)
    st = server.status()
    if as_json:
        click.echo(json.dumps(st, indent=1, default=str))
        return
    if st.get("owner"):
        click.echo(f"{'running' if st['running'] else 'not answering'} on another host: {st['owner']}")
        return
    click.echo(f"{'running' if st['running'] else 'stopped'}: {st['host']}:{st['port']}"
               + (f" pid {st['pid']}, {st.get('connections', 0)} connection(s)" if st["running"] else ""))
    for d in st.get("databases", []):
        size = d.get("size_bytes")
        click.echo(f"  {d['name']}: {size / 1e6:.1f} MB" if size is not None else f"  {d['name']}")


@db.command("url")
@click.argument("spec", type=click.Path(dir_okay=False))
def db_url(spec: str) -> None:
    """libpq URL of the sweep's ultrack database, without the password (set PGPASSWORD)."""
    from gridsearch.backends.postgres import db_name
    from gridsearch.postgres import DEFAULT_ROLE, Credentials, ultrack_address

    sw, server = _managed(spec)
    st = server.status()
    if not st["running"]:
        fail(st.get("owner") or f"{sw.workdir}: the server is not running; `gridsearch db start {spec}`",
             EXIT_FAILED)
    # not server.credentials(): that would reset the password under a running sweep
    where = Credentials(st["host"], st["port"], DEFAULT_ROLE)
    click.echo(f"postgresql://{ultrack_address(where, db_name(sw, 'main'))}")


if __name__ == "__main__":
    main()
