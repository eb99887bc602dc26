"""What the user sees while a sweep runs. The engine reports events; this module draws them."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gridsearch.costs import duration
from gridsearch.planner import Plan
from gridsearch.spec import Trial
from gridsearch.stages import Stage, start_label


class Reporter(Protocol):
    def sweep_started(self, plan: Plan) -> None: ...
    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None: ...
    def stage_started(self, stage: Stage, n_batches: int) -> None: ...
    def batch_done(self, stage: Stage, batch: int) -> None: ...
    def stage_done(self, stage: Stage, wall_s: float) -> None: ...
    def trial_finished(self, trial: Trial, ok: bool, note: str) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Silent:
    """For tests and --quiet: the same events, nothing drawn."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _params(trial: Trial) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in trial.params.items())


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
        )
        self.trials_task: Any = None
        self.stage_task: Any = None
        self.eta = Eta()

    def sweep_started(self, plan: Plan) -> None:
        runs = plan.stage_runs()
        done = len(plan.trials) - len(plan.pending)
        self.console.print(
            f"{len(plan.trials)} trials ({done} already done); stage runs planned: "
            + ", ".join(f"{s.label} {runs[s]}" for s in Stage)
            + f" (naive: {plan.naive_runs})"
        )
        self.eta.planned(plan)
        self.progress.start()
        self.trials_task = self.progress.add_task("trials", total=len(plan.trials), completed=done, eta="")

    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None:
        start = start_label(first_stage)
        self.eta.trial_started(first_stage)
        self.progress.update(self.trials_task, description=f"trial {k}/{n} {trial.key} from {start}")
        self.progress.console.print(f"[dim]trial {k}/{n} {trial.key}: {_params(trial)} (from {start})")

    def stage_started(self, stage: Stage, n_batches: int) -> None:
        if self.stage_task is not None:
            self.progress.remove_task(self.stage_task)
        self.stage_task = self.progress.add_task(f"  {stage.label} batches", total=n_batches, eta="")

    def batch_done(self, stage: Stage, batch: int) -> None:
        self.progress.advance(self.stage_task)

    def stage_done(self, stage: Stage, wall_s: float) -> None:
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
