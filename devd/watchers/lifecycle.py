"""Stopping devd-started watchers, and the daemon's half of `devd watchers --restart`.

Only processes `devd run` started are touched (processes.stop_run): the run must be recorded
from the kernel's word (the requesting process's SO_PEERCRED pid, never a pid a client
sent), and its pid, start time and uid are verified again right before each signal. A stop
is SIGTERM, then SIGKILL after the kill timeout, for the process and then what it started.

The restart itself is started by the CLI, not here: the command gets the environment of
the user's shell, as it did the first time, not the daemon's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devd.processes import stop_run
from devd.registry import Worktree
from devd.watchers.breaks import SERVICE, Break

if TYPE_CHECKING:
    from devd.watchers.monitor import WatcherMonitor


def service_of(b: Break) -> str | None:
    """The declared service a break record is of, None for a `devd run`."""
    return b.argv[1] if len(b.argv) == 2 and b.argv[0] == SERVICE else None


def restart_plan(monitor: WatcherMonitor, only: Worktree | None, max_watches: int | None,
                 userns: str | None, force: bool) -> dict[str, Any]:
    """Which failed runs to start again: those of worktrees that now have room for their
    estimated need (or all, with `force`). Still-running ones are stopped first; declared
    services are listed apart (`services`: the caller restarts them under the daemon)."""
    from devd.watchers.advice import preflight

    by_id = {w.id: w for w in monitor.registry.worktrees() if w.state != "gone"}
    grouped = monitor.records.by_worktree()
    runs, services, skipped, taken = [], [], [], 0
    for wt_id, records in grouped.items():
        wt = by_id.get(wt_id)
        if wt is None or (only is not None and wt.id != only.id):
            continue
        pre = preflight(monitor, wt, max_watches, userns)
        room = pre.get("remaining")
        if not force and room is not None and pre["need"] + taken > room:
            skipped.append({"worktree": str(wt.path), "why": (
                f"only {room} watches are left and it needs ~{pre['need']}: raise the limit "
                "first (`devd doctor`), or pass --force")})
            continue
        taken += pre["need"]
        latest = _latest_per_run(records)
        by_name = {name: b for b in latest if (name := service_of(b))}  # its latest run
        services += [{"worktree": str(wt.path), "worktree_id": wt.id, "pid": b.pid,
                      "kind": b.kind, "service": name} for name, b in by_name.items()]
        runs += [_restart(monitor, wt, b) for b in latest if not service_of(b)]
    return {"runs": [r for r in runs if r["argv"]], "services": services,
            "skipped": skipped + [r for r in runs if not r["argv"]]}


def _latest_per_run(records: list[Break]) -> list[Break]:
    latest: dict[tuple[int, float], Break] = {}
    for b in records:
        latest[(b.pid, b.create_time)] = b
    return list(latest.values())


def _restart(monitor: WatcherMonitor, wt: Worktree, b: Break) -> dict[str, Any]:
    entry: dict[str, Any] = {"worktree": str(wt.path), "worktree_id": wt.id, "pid": b.pid,
                             "kind": b.kind, "argv": b.argv, "cwd": b.cwd or str(wt.path)}
    if not b.argv:
        entry["why"] = f"pid {b.pid}: its command was not recorded (an older `devd run`)"
        return entry
    entry["stopped"] = stop_run(monitor.registry, wt.id, b.pid, b.create_time,
                                monitor.settings.kill_timeout)
    return entry
