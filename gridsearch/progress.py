"""What the user sees while a sweep runs. The engine reports events; this module draws them."""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


class RichReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.trials_task: Any = None
        self.stage_task: Any = None

    def sweep_started(self, plan: Plan) -> None:
        runs = plan.stage_runs()
        done = len(plan.trials) - len(plan.pending)
        self.console.print(
            f"{len(plan.trials)} trials ({done} already done); stage runs planned: "
            + ", ".join(f"{s.label} {runs[s]}" for s in Stage)
            + f" (naive: {plan.naive_runs})"
        )
        self.progress.start()
        self.trials_task = self.progress.add_task("trials", total=len(plan.trials), completed=done)

    def trial_started(self, k: int, n: int, trial: Trial, first_stage: Stage | None) -> None:
        start = start_label(first_stage)
        self.progress.update(self.trials_task, description=f"trial {k}/{n} {trial.key} from {start}")
        self.progress.console.print(f"[dim]trial {k}/{n} {trial.key}: {_params(trial)} (from {start})")

    def stage_started(self, stage: Stage, n_batches: int) -> None:
        if self.stage_task is not None:
            self.progress.remove_task(self.stage_task)
        self.stage_task = self.progress.add_task(f"  {stage.label} batches", total=n_batches)

    def batch_done(self, stage: Stage, batch: int) -> None:
        self.progress.advance(self.stage_task)

    def stage_done(self, stage: Stage, wall_s: float) -> None:
        pass

    def trial_finished(self, trial: Trial, ok: bool, note: str) -> None:
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
