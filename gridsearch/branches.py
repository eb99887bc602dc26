"""Branches of a sweep at once, on forked databases: the decisions, without I/O.

The pending trials form a prefix tree: segment configs, then (segment, link) prefixes, then
trials. Each node is one stage run. A node runs on a database that holds its parent's results;
running it clears that database from the node's stage on, so the parent's results stay. A
database therefore serves the nodes queued on it deepest first (the serial sweep's depth-first
walk) and never destroys a result a queued node still needs. When fewer than `parallel`
databases are alive, an idle database with several queued nodes is forked and the fork takes the
heaviest of them; root nodes (segment) need nothing and may start on a new, empty database. A
database with nothing queued and nothing running is dropped (its subtree is exported), except
main. Heaviest first everywhere: the branch with the most remaining work starts first, so the
makespan approaches the tree's critical path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gridsearch.spec import Trial
from gridsearch.stages import Stage

MAIN = "main"

# Relative cost of one stage run before anything is measured (the held-out 12-point grid
# on the test cluster: 43 s per segment run, 43 s per link run, 6 s per solve, ~2 s export)
DEFAULT_COST = {Stage.SEGMENT: 43.0, Stage.LINK: 43.0, Stage.SOLVE: 8.0}


@dataclass(eq=False)
class Node:
    """One stage run of the tree; `trials` are the pending trials under it, in walk order."""

    stage: Stage
    fingerprint: str
    trials: list[Trial]
    children: list[Node] = field(default_factory=list)
    weight: float = 0.0  # estimated remaining work of the subtree (this node included)

    @property
    def owner(self) -> Trial:
        """The trial this stage run is recorded under: the first pending one of the subtree."""
        return self.trials[0]

    def __repr__(self) -> str:
        return f"Node({self.stage.label} {self.fingerprint[:8]} x{len(self.trials)})"


def build_tree(order: Sequence[Trial], cost: Mapping[Stage, float] | None = None) -> list[Node]:
    """Root nodes (segment) of the trials in walk order; siblings keep that order."""
    costs = {**DEFAULT_COST, **(cost or {})}

    def grow(group: Sequence[Trial], stage: Stage) -> list[Node]:
        nodes: dict[str, Node] = {}
        for t in group:
            fp = t.fingerprints[stage]
            nodes.setdefault(fp, Node(stage, fp, [])).trials.append(t)
        for n in nodes.values():
            if stage < Stage.SOLVE:
                n.children = grow(n.trials, Stage(stage + 1))
            n.weight = costs[stage] + sum(c.weight for c in n.children)
        return list(nodes.values())

    return grow(order, Stage.SEGMENT)


def walk(nodes: Iterable[Node]) -> Iterable[Node]:
    for n in nodes:
        yield n
        yield from walk(n.children)


@dataclass(eq=False)
class Database:
    name: str
    held: dict[Stage, str | None]
    queue: list[Node] = field(default_factory=list)  # nodes whose parent this database holds
    busy: bool = False

    def holds(self, node: Node) -> bool:
        return self.held.get(node.stage) == node.fingerprint


@dataclass(frozen=True)
class Move:
    """Drop database `db`; or make it (a fork of `source`, or with source None a new empty one)
    when `create`, and run `node` on it. The engine carries out a batch of moves as drops, then
    creations, then runs: a fork copies its source before the source's own next run starts."""

    db: str
    node: Node | None = None
    source: str | None = None
    create: bool = False
    drop: bool = False


@dataclass
class Forest:
    """The scheduler's state: databases, the root nodes no database started yet, and the limit."""

    parallel: int
    databases: dict[str, Database]
    roots: list[Node]
    new_name: Callable[[], str]
    can_fork: bool = True
    room: int = 1 << 30  # forks the free space still allows
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, tree: list[Node], held: Mapping[str, Mapping[Stage, str | None]], parallel: int,
              new_name: Callable[[], str], can_fork: bool = True) -> Forest:
        """Place the tree on what the databases hold (a resumed sweep continues on each fork):
        a node some database holds is done there, and its children queue on that database."""
        dbs = {name: Database(name, dict(h)) for name, h in held.items()}
        dbs.setdefault(MAIN, Database(MAIN, {s: None for s in Stage}))
        forest = cls(parallel, dbs, [], new_name, can_fork)

        def place(nodes: list[Node], on: Database | None) -> None:
            for n in nodes:
                holder = next((d for d in dbs.values() if d.holds(n)), None)
                if holder is not None and n.stage == Stage.SOLVE:
                    holder.queue.append(n)  # solved, not exported yet: the export remains
                elif holder is not None:
                    place(n.children, holder)
                elif on is not None:
                    on.queue.append(n)
                else:
                    forest.roots.append(n)

        place(tree, None)
        return forest

    @property
    def idle(self) -> bool:
        """Nothing queued anywhere and nothing running: the sweep is done."""
        return not self.roots and not any(d.queue or d.busy for d in self.databases.values())

    def moves(self) -> list[Move]:
        """Everything that can start now, heaviest first."""
        out: list[Move] = []
        for d in list(self.databases.values()):
            if d.name != MAIN and not d.busy and not d.queue:
                del self.databases[d.name]
                out.append(Move(d.name, drop=True))
        # main with nothing queued takes root work before any new database is made
        free = sorted((d for d in self.databases.values() if not d.busy),
                      key=lambda d: -max((n.weight for n in d.queue), default=0.0))
        for d in free:
            if d.queue:
                out.append(self._run(d, _deepest(d.queue)))
            elif self.roots:
                out.append(self._run(d, self._root()))
        # more databases while the limit allows: forks of idle-at-start databases with queued
        # work, or new ones for root nodes; heaviest work first
        while len(self.databases) < self.parallel:
            options: list[tuple[float, Database | None]] = [  # the most work waiting on one database
                (sum(n.weight for n in d.queue), d) for d in free
                if d.queue and self.can_fork and self.room > 0]
            if self.roots:
                options.append((max(n.weight for n in self.roots), None))
            if not options:
                break
            _, source = max(options, key=lambda o: o[0])
            name = self.new_name()
            if source is None:
                self.databases[name] = db = Database(name, {s: None for s in Stage})
                out.append(self._run(db, self._root(), create=True))
                continue
            node = max(source.queue, key=lambda n: n.weight)
            source.queue.remove(node)
            self.room -= 1
            self.databases[name] = db = Database(name, dict(source.held))
            out.append(self._run(db, node, source=source.name))
        return out

    def _root(self) -> Node:
        """The heaviest root not started (the first among equals: walk order)."""
        node = max(self.roots, key=lambda n: n.weight)
        self.roots.remove(node)
        return node

    def _run(self, d: Database, node: Node, source: str | None = None, create: bool = False) -> Move:
        if node in d.queue:
            d.queue.remove(node)
        d.busy = True
        return Move(d.name, node, source=source, create=create or source is not None)

    def finished(self, name: str, node: Node, held: Mapping[Stage, str | None]) -> None:
        """`node` ran on database `name`, which now holds `held`: its children queue there."""
        d = self.databases[name]
        d.busy, d.held = False, dict(held)
        if d.holds(node):
            d.queue.extend(node.children)

    def failed(self, name: str, node: Node, held: Mapping[Stage, str | None]) -> list[Trial]:
        """`node` failed for its owner trial: that trial fails (with everything of it under the
        node); the node runs again for the next trial of its subtree, as the serial sweep does.
        Returns the trials given up (the owner)."""
        d = self.databases[name]
        d.busy, d.held = False, dict(held)
        owner = node.owner
        _forget(node, owner)
        if node.trials:
            d.queue.append(node) if node.stage > Stage.SEGMENT else self.roots.insert(0, node)
        return [owner]

    def stopped(self, name: str) -> None:
        """The database was not used (a fork that failed to be made)."""
        self.databases.pop(name, None)


def _forget(node: Node, trial: Trial) -> None:
    """Remove a given-up trial from a subtree (nodes left without trials vanish)."""
    node.trials = [t for t in node.trials if t.key != trial.key]
    for c in list(node.children):
        _forget(c, trial)
        if not c.trials:
            node.children.remove(c)
    node.weight = DEFAULT_COST[node.stage] * bool(node.trials) + sum(c.weight for c in node.children)


def _deepest(queue: list[Node]) -> Node:
    """What a database runs next: the deepest queued node (it clears nothing the others need),
    the heaviest among equals."""
    return max(queue, key=lambda n: (n.stage, n.weight))


@dataclass(frozen=True)
class Run:
    """One stage run of a simulated sweep."""

    start: float
    end: float
    db: str
    node: Node
    held_before: dict[Stage, str | None]


@dataclass
class Simulation:
    makespan: float
    runs: list[Run]
    forks: int
    databases: int  # at most alive at once


def after_run(held: Mapping[Stage, str | None], node: Node) -> dict[Stage, str | None]:
    """What a database holds once `node` ran on it: the node's result, nothing below it."""
    out = {s: (held.get(s) if s < node.stage else None) for s in Stage}
    out[node.stage] = node.fingerprint
    return out


def simulate(order: Sequence[Trial], parallel: int, cost: Mapping[Stage, float] | None = None,
             fork_s: float = 0.0, held: Mapping[str, Mapping[Stage, str | None]] | None = None) -> Simulation:
    """The sweep's makespan when each stage run takes `cost[stage]` seconds and `parallel`
    databases may be alive: the same decisions the engine takes, on a clock. `held`: what the
    existing databases hold (a resumed sweep goes on where each fork is), as Forest.start takes it."""
    import heapq
    import itertools

    costs = {**DEFAULT_COST, **(cost or {})}
    taken = set(held or {})
    names = (f"f{n}" for n in itertools.count(1) if f"f{n}" not in taken)
    forest = Forest.start(build_tree(order, costs), held or {}, parallel, lambda: next(names))
    clock, seq, forks, widest = 0.0, itertools.count(), 0, 1
    events: list[tuple[float, int, str, Node]] = []
    runs: list[Run] = []
    while not forest.idle:
        for m in forest.moves():
            if m.node is None:
                continue
            forks += m.source is not None
            start = clock + (fork_s if m.source is not None else 0.0)
            end = start + costs[m.node.stage]
            runs.append(Run(start, end, m.db, m.node, dict(forest.databases[m.db].held)))
            heapq.heappush(events, (end, next(seq), m.db, m.node))
        widest = max(widest, len(forest.databases))
        if not events:
            raise RuntimeError("the scheduler stalled with work left")  # a bug, never a user error
        clock = events[0][0]
        while events and events[0][0] == clock:  # the engine's poll reports them together too
            _, _, db, node = heapq.heappop(events)
            forest.finished(db, node, after_run(forest.databases[db].held, node))
    return Simulation(clock, runs, forks, widest)
