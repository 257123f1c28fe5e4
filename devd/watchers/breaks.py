"""Break records of devd-started watchers, kept in the registry so they outlive the daemon.

Each `devd run` records what it runs and where (argv, cwd), keyed by pid and start time.
A run can then be marked `broken` (its output showed a break line), `partial` (it watches
clearly fewer paths than its worktree has directories) or `stopped` (devd stopped it for
idleness). A new run in the same worktree replaces the records of runs that have exited;
`partial` lasts only as long as its process.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from devd.registry import Registry

KINDS = ("broken", "partial", "stopped")
# The recorded argv of a declared service's run: [SERVICE, its name]. The daemon starts a
# service again itself (its supervisor runs it), never the CLI.
SERVICE = "devd:service"


@dataclass(frozen=True)
class Break:
    """One record: which run, what happened, and how to start it again."""

    pid: int
    create_time: float
    kind: str
    worktree_id: str
    signature: str
    budget: str
    line: str
    at: float
    argv: list[str]
    cwd: str | None


def create_time(pid: int) -> float:
    """A live, unreaped process's start time as the registry keeps it; 0.0 if it is gone."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return 0.0
        return round(proc.create_time(), 2)
    except psutil.Error:
        return 0.0


def alive(pid: int, started: float) -> bool:
    return started != 0.0 and create_time(pid) == started


class Breaks:
    """The registry's watcher_runs and watcher_breaks tables, seen as Break records."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def run_started(self, wt_id: str, pid: int, argv: list[str], cwd: str) -> None:
        """Record a new run; forget the exited runs of its worktree and their records (the
        new run replaces them), and exited runs elsewhere that have no record."""
        flagged = {(b.pid, b.create_time) for b in self.all()}
        for r_pid, started, r_wt, _, _ in self.registry.watcher_runs():
            if alive(r_pid, started) or (r_wt != wt_id and (r_pid, started) in flagged):
                continue
            self.registry.drop_watcher_run(r_pid, started)
        for b in self.all():
            if b.worktree_id == wt_id and not alive(b.pid, b.create_time):
                self.registry.drop_watcher_run(b.pid, b.create_time)
        self.add_run(wt_id, pid, argv, cwd)

    def add_run(self, wt_id: str, pid: int, argv: list[str], cwd: str) -> None:
        """Record a run, replacing nothing (a service's restart after it crashed: the
        crash's break stays until the service is started anew)."""
        started = create_time(pid)
        if started and argv:
            self.registry.add_watcher_run(pid, started, wt_id, argv, cwd)

    def record(self, wt_id: str, pid: int, kind: str, signature: str, budget: str,
               line: str) -> Break | None:
        """Mark a run; a process that already exited is found by its recorded run."""
        started = create_time(pid) or self._recorded_start(wt_id, pid)
        if not started:
            return None
        self.registry.add_watcher_break(pid, started, kind, wt_id, signature, budget, line)
        return next((b for b in self.all() if (b.pid, b.create_time, b.kind) ==
                     (pid, started, kind)), None)

    def _recorded_start(self, wt_id: str, pid: int) -> float:
        starts = [t for p, t, w, _, _ in self.registry.watcher_runs() if p == pid and w == wt_id]
        starts += [t for p, t, w in self.registry.processes() if p == pid and w == wt_id]
        return max(starts, default=0.0)

    def all(self) -> list[Break]:
        """Every record, oldest first; `partial` ones of exited processes are dropped."""
        runs = {(p, t): (argv, cwd) for p, t, _, argv, cwd in self.registry.watcher_runs()}
        found = []
        for row in self.registry.watcher_breaks():
            key = (row["pid"], row["create_time"])
            if row["kind"] == "partial" and not alive(*key):
                self.registry.drop_watcher_run(*key, kinds=("partial",), keep_run=True)
                continue
            argv, cwd = runs.get(key, ([], None))
            found.append(Break(row["pid"], row["create_time"], row["kind"],
                               row["worktree_id"], row["signature"], row["budget"],
                               row["reason"], row["at"], argv, cwd))
        return found

    def by_worktree(self) -> dict[str, list[Break]]:
        grouped: dict[str, list[Break]] = {}
        for b in self.all():
            grouped.setdefault(b.worktree_id, []).append(b)
        return grouped

    def clear_partial(self, wt_id: str, keep: set[int]) -> None:
        """A worktree whose devd-started watchers now cover it: drop its `partial` marks."""
        for b in self.all():
            if b.worktree_id == wt_id and b.kind == "partial" and b.pid not in keep:
                self.registry.drop_watcher_run(b.pid, b.create_time, kinds=("partial",),
                                               keep_run=True)
