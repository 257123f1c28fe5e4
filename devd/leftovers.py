"""What of a gone worktree still runs: shown by `status` and `ports`, stopped by `gc`.

The directory is gone, so a process is matched by the path its cwd or executable had (Linux
shows it with " (deleted)") and by descent from a recorded `devd run` of the worktree. Only
the recorded runs and what they started are devd's to stop; anything else is named, and the
worktree's ports stay leased until it is stopped (PortsProvisioner.check_teardown).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import psutil

from devd import processes
from devd.owners import owning
from devd.registry import Registry, Worktree

if TYPE_CHECKING:
    from devd.handlers.core import ServiceCore as Service
    from devd.provisioners import Progress


def running(gone: list[Worktree], registry: Registry) -> dict[str, list[dict[str, Any]]]:
    """Per worktree id, {"pid", "command", "port", "devd_run"} of each live process that
    belongs to it. Cheap enough for every `devd status` with a gone worktree: one readlink
    per process, then a closer look only at the few that match."""
    if not gone:
        return {}
    worktrees = registry.worktrees()
    found: dict[str, set[int]] = {wt.id: set() for wt in gone}
    for pid, cwd in _cwds():
        owner = owning(cwd, worktrees)
        if owner is not None and owner.id in found:
            found[owner.id].add(pid)
    for pid, started, wt_id in registry.processes():
        if wt_id in found:
            found[wt_id] |= _run_family(pid, started)
    return {wt_id: _entries(wt_id, pids, worktrees, registry) for wt_id, pids in found.items()}


def _entries(wt_id: str, pids: set[int], worktrees: list[Worktree], registry: Registry
             ) -> list[dict[str, Any]]:
    entries = []
    for pid in sorted(pids):
        holder = processes.describe(pid)
        owner = processes.owner_of(holder, worktrees, registry)
        if holder.create_time is not None and owner is not None and owner.id == wt_id:
            entries.append({"pid": pid, "command": holder.command, "port": _port(pid),
                            "devd_run": processes.run_of(pid, registry, wt_id) is not None})
    return entries


def _cwds() -> list[tuple[int, str]]:
    """(pid, cwd) of every process whose cwd devd may read."""
    found = []
    for pid in psutil.pids():
        try:
            found.append((pid, os.readlink(f"/proc/{pid}/cwd")))
        except FileNotFoundError:
            found += _cwd_by_psutil(pid)  # no /proc (macOS), or the process just exited
        except OSError:
            continue  # another user's process
    return found


def _cwd_by_psutil(pid: int) -> list[tuple[int, str]]:
    try:
        return [(pid, psutil.Process(pid).cwd())]
    except (psutil.Error, OSError):
        return []


def _run_family(pid: int, started: float) -> set[int]:
    """A recorded run, if it still lives, and everything it started."""
    descendants = processes.family(pid, started)
    return set() if descendants is None else {pid, *(t.pid for t in descendants)}


def _port(pid: int) -> int | None:
    """The lowest TCP port the process listens on, if any."""
    try:
        return min(processes.listening_ports(psutil.Process(pid)), default=None)
    except psutil.Error:
        return None


def stop_runs(wt: Worktree, registry: Registry, timeout: float) -> list[dict[str, Any]]:
    """Stop every recorded `devd run` of `wt` and what it started (TERM, then KILL), each
    re-verified right before each signal; {"pid", "outcome"} of each."""
    return [{"pid": pid, "outcome": processes.stop_run(registry, wt.id, pid, started, timeout)}
            for pid, started, wt_id in registry.processes() if wt_id == wt.id]


def stop_gone(service: Service, gone: list[Worktree], progress: Progress
              ) -> dict[str, list[dict[str, Any]]]:
    """Before gc releases gone worktrees: stop what `devd run` started for them."""
    stopped = {}
    for wt in gone:
        with service._lock(wt.id):  # a worktree re-created meanwhile keeps its processes
            fresh = service.registry.worktree(wt.id)
            if fresh is None or fresh.state != "gone":
                continue
            stopped[wt.id] = stop_runs(wt, service.registry, service.settings.kill_timeout)
        for entry in stopped[wt.id]:
            if entry["outcome"] != "already exited":  # a record of a run long over: noise
                progress("gc", f"pid {entry['pid']} of {wt.path}: {entry['outcome']}")
    return stopped


def add_to_status(service: Service, entries: list[dict[str, Any]], chosen: list[Worktree]
                  ) -> list[dict[str, Any]]:
    """Gone worktrees get "processes": what of them still runs (nothing else pays)."""
    found = running([wt for wt in chosen if wt.state == "gone"], service.registry)
    for entry in entries:
        if entry["id"] in found:
            entry["processes"] = found[entry["id"]]
    return entries
