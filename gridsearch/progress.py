"""What the user sees while a sweep runs. The engine reports events; this module draws them."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gridsearch.costs import duration
from gridsearch.planner import Plan
from gridsearch.spec import Trial
from gridsearch.stages import Stage, start_label


class Reporter(Protocol):
    def sweep_started(self, plan: Plan) -> None: ...
    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None: ...
    def stage_started(self, stage: Stage, n_batches: int, trial: Trial | None = None) -> None: ...
    def batch_done(self, stage: Stage, batch: int, trial: Trial | None = None) -> None: ...
    def stage_done(self, stage: Stage, wall_s: float, trial: Trial | None = None) -> None: ...
    def trial_finished(self, trial: Trial, ok: bool, note: str) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Silent:
    """For tests and --quiet: the same events, nothing drawn."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def for_console(console: Console) -> Reporter:
    """The live display on a terminal; without one (a SLURM job's log, nohup, a pipe) one line per
    event, which rich would otherwise wrap at 80 columns and redraw."""
    return RichReporter(console) if console.is_terminal else LogReporter(console.file)


def _params(trial: Trial) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in trial.params.items())


def _plan_line(plan: Plan) -> str:
    runs = plan.stage_runs()
    done = len(plan.trials) - len(plan.pending)
    return (f"{len(plan.trials)} trials ({done} already done); stage runs planned: "
            + ", ".join(f"{s.label} {runs[s]}" for s in Stage) + f" (naive: {plan.naive_runs})")


def _trial_line(k: int, n: int, trial: Trial, first_stage: Stage | None) -> str:
    return f"trial {k}/{n} {trial.key}: {_params(trial)} (from {start_label(first_stage)})"


class Eta:
    """Remaining time from the stage runs this sweep has finished: the median wall time of each
    stage's runs, times the runs of it still to come. Measured live, it includes what the ledger's
    cost model cannot see (scheduling, queueing, export). Unknown until every stage still to come
    has finished once."""

    def __init__(self) -> None:
        self.remaining: Counter[Stage] = Counter()
        self.walls: dict[Stage, list[float]] = {}
        self.current: list[Stage] = []

    def planned(self, plan: Plan) -> None:
        self.remaining = Counter(s for p in plan.pending for s in p.stages)

    def trial_started(self, first_stage: Stage | None) -> None:
        self.current = [] if first_stage is None else [s for s in Stage if s >= first_stage]

    def stage_done(self, stage: Stage, wall_s: float) -> None:
        self.walls.setdefault(stage, []).append(wall_s)
        self._drop(stage)

    def trial_finished(self) -> None:
        """A failed trial's later stages never run."""
        for stage in list(self.current):
            self._drop(stage)

    def _drop(self, stage: Stage) -> None:
        if stage in self.current:
            self.current.remove(stage)
        self.remaining[stage] = max(0, self.remaining[stage] - 1)

    def seconds(self) -> float | None:
        todo = {s: n for s, n in self.remaining.items() if n > 0}
        if any(s not in self.walls for s in todo):
            return None
        return sum(n * statistics.median(self.walls[s]) for s, n in todo.items())

    def text(self) -> str:
        left = self.seconds()
        return "" if left is None else f"ETA {duration(left)}"


class RichReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=False,
            redirect_stdout=False,  # ultrack's prints and tqdm bars go to the stage's log (fd_redirect),
            redirect_stderr=False,  # not above the display
        )
        self.trials_task: Any = None
        self.stage_task: Any = None
        self.eta = Eta()

    def sweep_started(self, plan: Plan) -> None:
        done = len(plan.trials) - len(plan.pending)
        self.console.print(_plan_line(plan))
        self.eta.planned(plan)
        self.progress.start()
        self.trials_task = self.progress.add_task("trials", total=len(plan.trials), completed=done, eta="")

    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None:
        start = start_label(first_stage)
        self.eta.trial_started(first_stage)
        self.progress.update(self.trials_task, description=f"trial {k}/{n} {trial.key} from {start}")
        self.progress.console.print(f"[dim]{_trial_line(k, n, trial, first_stage)}")

    def stage_started(self, stage: Stage, n_batches: int, trial: Trial | None = None) -> None:
        if self.stage_task is not None:
            self.progress.remove_task(self.stage_task)
        self.stage_task = self.progress.add_task(f"  {stage.label} batches", total=n_batches, eta="")

    def batch_done(self, stage: Stage, batch: int, trial: Trial | None = None) -> None:
        self.progress.advance(self.stage_task)

    def stage_done(self, stage: Stage, wall_s: float, trial: Trial | None = None) -> None:
        self.eta.stage_done(stage, wall_s)
        self.progress.update(self.trials_task, eta=self.eta.text())

    def trial_finished(self, trial: Trial, ok: bool, note: str) -> None:
        self.eta.trial_finished()
        self.progress.update(self.trials_task, eta=self.eta.text())
        self.progress.advance(self.trials_task)
        if not ok:
            self.progress.console.print(f"[red]trial {trial.key} failed: {note}")

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        if self.stage_task is not None:
            self.progress.remove_task(self.stage_task)
            self.stage_task = None
        self.progress.stop()


class LogReporter:
    """For a job log: one line per event, starting with the date and time, never wrapped, never
    redrawn. Batches are not one line each (a 225-frame movie has 225 per stage): a stage's progress
    is said at most once a minute, and its end with its wall time. A line names the trial, since
    with `parallel` the stages of several trials interleave."""

    PROGRESS_EVERY_S = 60.0

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.eta = Eta()
        self.total = 0
        self.finished = 0
        self.batches: dict[tuple[str, Stage], tuple[int, int, float]] = {}  # -> done, total, last said

    def _line(self, text: str) -> None:
        self.out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' | '.join(text.splitlines())}\n")
        self.out.flush()

    def sweep_started(self, plan: Plan) -> None:
        self.total, self.finished = len(plan.trials), len(plan.trials) - len(plan.pending)
        self.eta.planned(plan)
        self._line(_plan_line(plan))

    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None:
        self.eta.trial_started(first_stage)
        self._line(_trial_line(k, n, trial, first_stage))

    def stage_started(self, stage: Stage, n_batches: int, trial: Trial | None = None) -> None:
        key = trial.key if trial else ""
        self.batches[key, stage] = (0, n_batches, time.monotonic())
        self._line(f"{key} {stage.label}: {n_batches} batch{'' if n_batches == 1 else 'es'}".lstrip())

    def batch_done(self, stage: Stage, batch: int, trial: Trial | None = None) -> None:
        key = trial.key if trial else ""
        done, total, said = self.batches.get((key, stage), (0, 0, time.monotonic()))
        done += 1
        if time.monotonic() - said >= self.PROGRESS_EVERY_S and done < total:
            said = time.monotonic()
            self._line(f"{key} {stage.label}: {done}/{total} batches".lstrip())
        self.batches[key, stage] = (done, total, said)

    def stage_done(self, stage: Stage, wall_s: float, trial: Trial | None = None) -> None:
        key = trial.key if trial else ""
        self.batches.pop((key, stage), None)
        self.eta.stage_done(stage, wall_s)
        self._line(f"{key} {stage.label} done in {wall_s:.1f} s".lstrip())

    def trial_finished(self, trial: Trial, ok: bool, note: str) -> None:
        self.eta.trial_finished()
        self.finished += 1
        eta = f"; {self.eta.text()}" if self.eta.text() else ""
        what = "done" if ok else f"failed: {note}"
        self._line(f"trial {trial.key} {what} ({self.finished}/{self.total} finished{eta})")

    def message(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        pass
