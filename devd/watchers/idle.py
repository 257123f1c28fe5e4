"""Stop the devd-started watchers of worktrees nobody used for a while (off by default:
`DEVD_WATCHERS_IDLE_STOP=2h` turns it on).

"Used" means any of, within the idle time:
- a devd request named the worktree (`devd run`, `env`, `status PATH`, a shell prompt's
  `devd status .`, ...): free, the daemon sees every request;
- a file or directory under it changed (mtime), outside `.git`, `node_modules` and build
  output (which the watcher itself rewrites). A stat walk, but only of worktrees whose
  requests are already older than the idle time, stopping at the first recent entry;
- a TCP connection is established on one of its leased ports (a browser tab open on the
  dev server: its HMR socket stays connected). One pass over the socket table.
Since the daemon started counts as a use: a restarted daemon never stops anything at once.
Only processes `devd run` started and that hold an inotify instance (themselves or a
descendant) are stopped; see processes.stop_run for the checks made before each signal.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from devd import processes
from devd.processes import stop_run
from devd.watchers.estimate import walk

if TYPE_CHECKING:
    from devd.watchers.monitor import View, WatcherMonitor

log = logging.getLogger("devd")


class IdleStopper:
    """Remembers when each worktree was last named in a request; stops idle watchers."""

    def __init__(self, monitor: WatcherMonitor) -> None:
        self.monitor = monitor
        self._since = time.time()
        self._used: dict[str, float] = {}

    def touch(self, wt_id: str) -> None:
        """A request named this worktree."""
        self._used[wt_id] = time.time()

    def check(self, view: View) -> list[tuple[int, str]]:
        """Stop the watchers of idle worktrees; returns (pid, outcome) of each stopped."""
        idle = self.monitor.settings.idle_stop_seconds
        if not idle:
            return []
        cutoff = time.time() - idle
        stopped = []
        for wt_id, runs in self._watching(view).items():
            if self._used.get(wt_id, self._since) > cutoff or self._in_use(wt_id, cutoff):
                continue
            for pid, started in runs:
                stopped.append((pid, self._stop(wt_id, pid, started, idle)))
        return stopped

    def _watching(self, view: View) -> dict[str, set[tuple[int, float]]]:
        """Recorded `devd run` processes holding inotify instances, or with descendants that
        do, per worktree."""
        recorded = {p: (t, w) for p, t, w in self.monitor.registry.processes()}
        found: dict[str, set[tuple[int, float]]] = {}
        for c in view.sample.consumers:
            owner = view.owners.get(c.pid)
            if not c.instances or owner is None or owner.run_pid not in recorded:
                continue
            started, wt_id = recorded[owner.run_pid]
            found.setdefault(wt_id, set()).add((owner.run_pid, started))
        return found

    def _in_use(self, wt_id: str, cutoff: float) -> bool:
        wt = self.monitor.registry.worktree(wt_id)
        if wt is None:
            return True  # released meanwhile: not ours to judge
        ports = {port for port, _, _ in self.monitor.registry.leases(wt_id)}
        changed = changed_since(str(wt.path), cutoff)
        if changed:
            self._used[wt_id] = changed  # no walk again until that is old too
        return bool(changed) or connected(ports)

    def _stop(self, wt_id: str, pid: int, started: float, idle: float) -> str:
        outcome = stop_run(self.monitor.registry, wt_id, pid, started,
                           self.monitor.settings.kill_timeout)
        wt = self.monitor.registry.worktree(wt_id)
        where = wt.path if wt else wt_id
        log.warning("stopped idle watcher pid %d of %s (%s): unused for %.0f s", pid, where,
                    outcome, idle)
        if outcome in ("terminated", "killed"):
            reason = (f"pid {pid} stopped after {idle:.0f} s without use; "
                      "`devd watchers --restart` starts it again")
            self.monitor.registry.add_watcher_break(pid, started, "stopped", wt_id, "idle",
                                                    "idle", reason)
        return outcome


def changed_since(root: str, cutoff: float) -> float:
    """The mtime of some entry under `root` newer than `cutoff` (0.0 if none), skipping
    ignored names; stops at the first one found."""
    for path, found in walk(root):
        files = [entry for entry in found if not entry.is_dir(follow_symlinks=False)]
        for mtime in (_mtime(path), *(_mtime(entry) for entry in files)):
            if mtime > cutoff:
                return mtime
    return 0.0


def _mtime(entry: str | os.DirEntry[str]) -> float:
    try:
        return os.stat(entry, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0  # vanished or unreadable: no evidence of use


def connected(ports: set[int]) -> bool:
    """Is a TCP connection established on one of these local ports?"""
    return bool(ports) and bool(ports & processes.established_ports())
