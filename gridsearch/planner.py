"""Order trials so that each stage result is computed once, and decide where each trial starts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gridsearch.spec import Trial
from gridsearch.stages import Stage, earliest_changed_stage


@dataclass(frozen=True)
class PlannedTrial:
    trial: Trial
    first_stage: Stage | None  # None: the database already holds its solution; only export remains
    done: bool  # finished in an earlier run: nothing to do

    @property
    def stages(self) -> list[Stage]:
        if self.done or self.first_stage is None:
            return []
        return [s for s in Stage if s >= self.first_stage]


@dataclass(frozen=True)
class Plan:
    trials: list[PlannedTrial]

    @property
    def pending(self) -> list[PlannedTrial]:
        return [p for p in self.trials if not p.done]

    def stage_runs(self) -> dict[Stage, int]:
        counts = {s: 0 for s in Stage}
        for p in self.trials:
            for s in p.stages:
                counts[s] += 1
        return counts

    @property
    def naive_runs(self) -> int:
        """What a workflow that recomputes every stage of every pending trial does."""
        return 3 * len(self.pending)


def dfs_order(trials: Sequence[Trial], first: Mapping[Stage, str | None] | None = None) -> list[Trial]:
    """Depth-first walk of the segment -> link -> solve prefix tree.

    Siblings keep grid order, except that the branch the database already holds goes first: a
    resumed sweep continues on what is there instead of throwing it away."""
    held = first or {}

    def walk(group: Sequence[Trial], level: int) -> list[Trial]:
        if level > Stage.SOLVE:
            return list(group)
        stage = Stage(level)
        children: dict[str, list[Trial]] = {}
        for t in group:
            children.setdefault(t.prefix(stage), []).append(t)
        keys = list(children)
        match = held.get(stage)
        if match in children:
            keys.remove(match)
            keys.insert(0, match)
        return [t for k in keys for t in walk(children[k], level + 1)]

    # Fingerprints chain upstream, so a match at one level implies a match at every level above.
    return walk(trials, Stage.SEGMENT.value)


def make_plan(
    trials: Iterable[Trial],
    held: Mapping[Stage, str | None],
    finished: set[str],
) -> Plan:
    """Simulate the database along the DFS order: each trial starts at its first changed stage."""
    trials = list(trials)
    pending = [t for t in trials if t.key not in finished]
    order = dfs_order(pending, held)
    state: dict[Stage, str | None] = dict(held)
    planned = [PlannedTrial(t, None, True) for t in trials if t.key in finished]
    for t in order:
        first = earliest_changed_stage(state, t.fingerprints)
        planned.append(PlannedTrial(t, first, False))
        state = dict(t.fingerprints)
    return Plan(planned)
