"""Leased ports another worktree's process, or one of no worktree, listens on: the
collision devd exists to stop, which `ready` and a `+` on the row would otherwise hide.

The status pass runs this every few seconds, so a holder is looked up (a pass over every
process's fds) only for a listening socket it has not seen before: the /proc table names
each socket by inode, and one inode is one socket of one process for good.
"""

from __future__ import annotations

from typing import Any

from devd import processes
from devd.registry import Registry, Worktree


class ForeignHolders:
    """Per worktree, its leased ports that a process it does not own listens on."""

    def __init__(self) -> None:
        # socket inode → (port, holder, owning worktree's id and path, or None)
        self._seen: dict[str, tuple[int, processes.Holder, tuple[str, str] | None]] = {}

    def scan(self, worktrees: list[Worktree], ports: dict[str, dict[str, int]],
             registry: Registry) -> dict[str, list[dict[str, Any]]]:
        """`ports`: each live worktree's leased ports by name. Holders devd may not inspect
        (another user's process) are left out: devd cannot say whose they are."""
        table = processes.listen_table()
        if table is None:  # no /proc: the holder of every port costs a full psutil pass
            return {}
        leased = {port: wt_id for wt_id, named in ports.items() for port in named.values()}
        sockets = {inode: port for inode, port in table.items() if port in leased}
        new = [inode for inode in sockets if inode not in self._seen]
        if new:
            pids = processes.listener_pids()
            for inode in new:
                holder = processes.describe(pids.get(sockets[inode]))
                owner = processes.owner_of(holder, worktrees, registry) \
                    if holder.command != "?" else None
                self._seen[inode] = (sockets[inode], holder,
                                     (owner.id, str(owner.path)) if owner else None)
        self._seen = {inode: seen for inode, seen in self._seen.items() if inode in sockets}
        found: dict[str, list[dict[str, Any]]] = {}
        for port, holder, owned_by in self._seen.values():
            wt_id = leased[port]
            if holder.pid is None or holder.command == "?" or \
                    (owned_by and owned_by[0] == wt_id):
                continue
            name = next(n for n, p in ports[wt_id].items() if p == port)
            found.setdefault(wt_id, []).append({
                "name": name, "port": port, "pid": holder.pid, "command": holder.command,
                "worktree": owned_by[1] if owned_by else None})
        return found
