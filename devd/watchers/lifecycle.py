"""Stopping devd-started watchers, and the daemon's half of `devd watchers --restart`.

Only processes `devd run` started are touched: the registry's recorded pid and start time
must match the live process, and it must belong to the daemon's user. A stop is SIGTERM,
then SIGKILL after the kill timeout, for the process and then whatever it started.

The restart itself is started by the CLI, not here: the command gets the environment of
the user's shell, as it did the first time, not the daemon's.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from devd.registry import Worktree
from devd.watchers.breaks import Break, create_time

if TYPE_CHECKING:
    from devd.watchers.monitor import WatcherMonitor


def stop_run(pid: int, started: float, timeout: float) -> str:
    """Stop one recorded run and its descendants; returns how it ended."""
    if create_time(pid) != started or started == 0.0:
        return "already exited"
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid():
            return "not ours"  # a recorded pid now held by another user: never touched
        family = proc.children(recursive=True)
    except psutil.Error:
        return "already exited"
    outcome = _end([proc], timeout)
    _end([p for p in family if _running(p)], timeout)
    return outcome


def _end(procs: list[psutil.Process], timeout: float) -> str:
    """SIGTERM, wait, SIGKILL what is left (a zombie counts as gone: its parent reaps it)."""
    if not procs:
        return "terminated"
    for proc in procs:
        _signal(proc, kill=False)
    if _gone(procs, timeout):
        return "terminated"
    for proc in procs:
        _signal(proc, kill=True)
    _gone(procs, timeout)
    return "killed"


def _signal(proc: psutil.Process, kill: bool) -> None:
    try:
        proc.kill() if kill else proc.terminate()
    except psutil.Error:
        return  # exited meanwhile


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(procs: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in procs):
            return True
        time.sleep(0.02)
    return not any(_running(p) for p in procs)


def restart_plan(monitor: WatcherMonitor, only: Worktree | None, max_watches: int | None,
                 userns: str | None, force: bool) -> dict[str, Any]:
    """Which failed runs to start again: those of worktrees that now have room for their
    estimated need (or all, with `force`). Still-running ones are stopped first."""
    from devd.watchers.advice import preflight

    by_id = {w.id: w for w in monitor.registry.worktrees() if w.state != "gone"}
    grouped = monitor.records.by_worktree()
    runs, skipped, taken = [], [], 0
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
        runs += [_restart(monitor, wt, b) for b in _latest_per_run(records)]
    return {"runs": [r for r in runs if r["argv"]],
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
    entry["stopped"] = stop_run(b.pid, b.create_time, monitor.settings.kill_timeout)
    return entry
