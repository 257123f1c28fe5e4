"""Requests about processes and ports: who holds a port, stopping it, recording `devd run`."""

from __future__ import annotations

import re
from typing import Any

from devd import processes
from devd.errors import DevdError, UsageError
from devd.handlers.core import ServiceCore
from devd.provisioners import Progress
from devd.provisioners.ports import lease_internal
from devd.watchers import api as watchers_api

# Ad hoc leases (`lease_port`, for a server devd.toml does not name): an internal lease
# name, so provisioning keeps it; it goes with the worktree's registration (release, gc).
ADHOC = "_adhoc:"
ADHOC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


class ProcessRequests(ServiceCore):
    """Ports and processes: only ever the asking worktree's, as the kernel tells it."""

    def do_ports(self, progress: Progress) -> list[dict[str, Any]]:
        # Leases first: a provision in flight adds a worktree before its leases, never after,
        # and a lease whose worktree was released meanwhile is left out.
        leases = self.registry.leases()
        by_id = {wt.id: wt for wt in self.registry.worktrees()}
        held = processes.listeners()
        rows = []
        for port, name, wt_id in leases:
            if wt_id not in by_id:
                continue
            holder = held.get(port)
            owner = processes.owner_of(holder, list(by_id.values()), self.registry) \
                if holder else None
            rows.append({
                "port": port, "name": name, "worktree": str(by_id[wt_id].path),
                "worktree_id": wt_id, "worktree_state": by_id[wt_id].state,
                "listening": holder is not None,
                "pid": holder.pid if holder else None,
                "command": holder.command if holder else None,
                "cwd": holder.cwd if holder else None,
                "owner_worktree": str(owner.path) if owner else None,
                "owner_state": owner.state if owner else None,
            })
        return rows

    def do_port_owner(self, progress: Progress, port: int) -> dict[str, Any]:
        """Who holds `port`: the worktree that leased it (if any) and what listens on it."""
        _check_port(port)
        lease = next(((name, wt_id) for p, name, wt_id in self.registry.leases() if p == port),
                     None)
        leaser = self.registry.worktree(lease[1]) if lease else None
        holder = processes.listeners().get(port)
        owner = processes.owner_of(holder, self.registry.worktrees(), self.registry) \
            if holder else None
        return {"port": port, "lease_name": lease[0] if lease else None,
                "leased_by": str(leaser.path) if leaser else None,
                "listening": holder is not None,
                "pid": holder.pid if holder else None,
                "command": holder.command if holder else None,
                "cwd": holder.cwd if holder else None,
                "owner_worktree": str(owner.path) if owner else None,
                "owner_state": owner.state if owner else None}

    def do_lease_port(self, progress: Progress, path: str, name: str) -> dict[str, Any]:
        """A port of the worktree's for `name`, leased once and then the same every time,
        until the worktree is released (not written to .env: the caller asked for it)."""
        if not ADHOC_NAME.fullmatch(name):
            raise UsageError(f"port name {name[:60]!r} is not allowed",
                             "use 1-40 lowercase letters, digits, '-' or '_'")
        wt = self.find(path)
        if wt.state == "gone":
            raise UsageError(f"{wt.path} is gone", "lease ports for a worktree that exists")
        with self._lock(wt.id):
            port = lease_internal(self.context(wt, strict=False), ADHOC + name)
        return {"worktree": str(wt.path), "name": name, "port": port}

    def do_kill_port(self, progress: Progress, port: int, path: str) -> dict[str, Any]:
        _check_port(port)
        asked = self.find(path)
        holder = processes.listeners().get(int(port))
        if holder is None:
            raise DevdError(f"nothing listens on port {port}", "", code="not_listening")
        owner = processes.owner_of(holder, self.registry.worktrees(), self.registry)
        processes.check_killable(int(port), holder, owner, asked)
        progress("kill", f"stopping pid {holder.pid} `{holder.command}`")
        outcome = processes.stop_holder(int(port), holder, asked, self.registry,
                                        self.settings.kill_timeout)
        return {"port": port, "pid": holder.pid, "command": holder.command, "outcome": outcome}

    def do_run_started(self, progress: Progress, path: str, pid: int | None = None,
                       argv: list[str] | None = None, cwd: str | None = None
                       ) -> dict[str, Any]:
        """Record the requesting process itself (the kernel's peer pid) as a `devd run`;
        a `pid` the client sends is ignored: its word makes no process devd-started."""
        wt = self.find(path)
        peer = self.peer_pid()
        if not peer or peer < 0:  # no SO_PEERCRED here, or a pid outside our namespace
            return {"worktree": str(wt.path), "pid": None}
        processes.prune_runs(self.registry)  # else every `devd run` ever stays till gc
        recorded, started = processes.record_run(self.registry, peer, wt.id,
                                                 self.peer_confirmed)
        watchers_api.run_started(self, wt, recorded, argv, cwd)
        return {"worktree": str(wt.path), "pid": recorded,
                "token": self.run_tokens.issue(recorded, started, wt.id)}

    def do_run_event(self, progress: Progress, path: str, signature: str, budget: str,
                     line: str, pid: int | None = None, argv: list[str] | None = None,
                     cwd: str | None = None, token: str | None = None) -> dict[str, Any]:
        """A break line, accepted only from a recorded run of that worktree or one of its
        descendants (the kernel's peer pid and ancestry, or the run's token once the run
        itself has exited); `pid` is ignored."""
        return watchers_api.run_event(self, self.find(path), signature, budget, line,
                                      argv or [], cwd, token)


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:  # a typo, not a port nothing listens on
        raise UsageError(f"port {port} is out of range (1-65535)", "give a TCP port")
