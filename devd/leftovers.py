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
from devd.processes import Holder
from devd.registry import Registry, Worktree

if TYPE_CHECKING:
    from devd.handlers import Service
    from devd.provisioners import Progress


def running(gone: list[Worktree], registry: Registry) -> dict[str, list[dict[str, Any]]]:
    """Per worktree id, {"pid", "command", "port", "devd_run"} of each live process that
    belongs to it (one pass over sockets and processes for all of them)."""
    if not gone:
        return {}
    worktrees, held = registry.worktrees(), processes.listeners()
    ports: dict[int, int] = {}
    for port, holder in sorted(held.items()):
        ports.setdefault(holder.pid or 0, port)
    found: dict[str, dict[int, Holder]] = {wt.id: {} for wt in gone}
    for holder in [*held.values(), *_ours()]:
        owner = processes.owner_of(holder, worktrees, registry) if holder.pid else None
        if owner is not None and owner.id in found:
            found[owner.id].setdefault(holder.pid or 0, holder)
    return {wt_id: [{"pid": pid, "command": h.command, "port": ports.get(pid),
                     "devd_run": processes.run_of(pid, registry, wt_id) is not None}
                    for pid, h in sorted(procs.items())]
            for wt_id, procs in found.items()}


def _ours() -> list[Holder]:
    """Every process of this user (others' cwd cannot be read anyway)."""
    uid, found = os.getuid(), []
    for proc in psutil.process_iter():
        holder = processes.of_process(proc)
        if holder.uid == uid:
            found.append(holder)
    return found


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
