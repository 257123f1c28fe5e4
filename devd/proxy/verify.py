"""Where Caddy may send a route's requests: an address on which the worktree's own process
listens on the route's port, verified from the kernel's socket table, else nowhere (the
route answers devd's page instead, see config._page).

"The worktree's own": for a port a `devd up` service serves, a process of that service's
group once it is ready; for any other, a process of this user that devd counts as the
worktree's (processes.owner_of: its cwd or executable in the worktree, or descent from a
recorded `devd run`). Never the name `localhost`, never an address another process shares
(SO_REUSEPORT), never a port held only by someone else (a squatter on 127.0.0.1 while the
owner listens on [::1] only, or while it is down).

Each pass reads the listen table (sock_diag, ~0.5 ms); a verdict is kept per set of
sockets on the port while every process that held them lives, so holders are looked up
(one pass over this user's fds for all the routes that changed) only when a listener came
or went or a holder exited. Left open: the pass runs every 0.5 s, not when Caddy connects;
between an owner's exit and the next pass, whoever binds the port first gets requests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import psutil

from devd import processes
from devd.registry import Registry
from devd.services.groups import dial_host

Key = tuple[str, str]  # (worktree id, port name)
# (worktree id, port name) → the group id of the service serving it once it is ready, None
# while it is up but not ready (booting, backing off, stopping).
Services = Callable[[], Mapping[Key, "int | None"]]
NO_SERVICE = -1
UNKNOWN = -1  # a socket's uid, where the table does not say (psutil's)
Sockets = dict[str, tuple[str, int, int]]  # inode (or "pid:N:…") → (address, port, uid)
log = logging.getLogger("devd")


Memo = tuple[Key, frozenset[str], "int | None"]  # route, its sockets, its service's group
Verdict = tuple["str | None", frozenset[int]]  # the address to dial, and who held it then


class Verifier:
    """Verified dial addresses for the routes the proxy pushes; `dials` is its face."""

    def __init__(self, registry: Registry, services: Services) -> None:
        self._registry, self._services = registry, services
        self._known: dict[Memo, Verdict] = {}

    def dials(self, routes: list[tuple[Key, int]]) -> dict[Key, str]:
        """(worktree id, port name) → "127.0.0.1", "[::1]", ... for each route (key, port)
        whose port the worktree's own process listens on; the others are left out."""
        sockets, services = listening(), self._services()
        by_port: dict[int, Sockets] = {}
        for inode, entry in sockets.items():
            by_port.setdefault(entry[1], {})[inode] = entry
        memos = {key: (key, frozenset(by_port.get(port, {})), services.get(key, NO_SERVICE))
                 for key, port in routes}
        # A verdict stands while the same sockets are there and everyone who held them
        # lives: a holder gone (a parent that handed its socket on, or forked and exited)
        # may leave it to a process that is not the worktree's.
        known = {memo: self._known[memo] for memo in memos.values()
                 if memo in self._known and all(map(psutil.pid_exists, self._known[memo][1]))}
        fresh = [(key, port) for key, port in routes if memos[key] not in known]
        holders = self._holders([by_port.get(port, {}) for _, port in fresh])
        for key, port in fresh:
            known[memos[key]] = self._verify(key[0], memos[key][2], by_port.get(port, {}),
                                             holders)
        self._known = known  # only what the routes of now need
        return {key: dial for key, memo in memos.items()
                if (dial := known[memo][0]) is not None}

    @staticmethod
    def _holders(tables: list[Sockets]) -> dict[str, set[int]]:
        """Every holder of this user's sockets in `tables`: one pass over the processes'
        fds for all routes that changed, not one per route."""
        mine = {i for at in tables for i, (_, _, uid) in at.items()
                if uid in (os.getuid(), UNKNOWN)}
        named = {i: {int(i.split(":")[1])} for i in mine if i.startswith("pid:")}
        rest = mine - set(named)
        return named | (processes.socket_holders(rest) if rest else {})

    def _verify(self, wt_id: str, group: int | None, at: Sockets,
                holders: dict[str, set[int]]) -> Verdict:
        if group is None or not at:  # a service not ready yet, or nothing listens
            return None, frozenset()
        # Own: a socket of this user every holder of which is the worktree's (one shared
        # with a stranger would hand the stranger some of the requests).
        own = {i for i in at if holders.get(i)
               and all(self._owns(wt_id, group, pid) for pid in holders[i])}
        pids = frozenset(pid for i in own for pid in holders[i])
        return safe_dial({at[i][0] for i in own}, {at[i][0] for i in at if i not in own}), pids

    def _owns(self, wt_id: str, group: int, pid: int) -> bool:
        if group != NO_SERVICE:
            try:
                return os.getpgid(pid) == group
            except OSError:
                return False
        holder = processes.describe(pid)
        owner = processes.owner_of(holder, self._registry.worktrees(), self._registry)
        return owner is not None and owner.id == wt_id and holder.uid == os.getuid()


def listening() -> Sockets:
    """The listen table: the kernel's (Linux: sock_diag), else psutil's (macOS, as the
    supervisor's readiness reads it there), whose entries name their holder ("pid:N:...")
    and leave its uid to be asked."""
    found = processes.listen_entries()
    if found is not None:
        return found
    table: Sockets = {}
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.pid:
                address, port = conn.laddr.ip, conn.laddr.port
                table[f"pid:{conn.pid}:{address}:{port}"] = (address, port, UNKNOWN)
    except (psutil.Error, OSError) as exc:  # macOS wants root for it: every name a page
        log.warning("proxy: cannot read the listen table (%s): no route can be verified, "
                    "each answers devd's page", exc)
    return table


def safe_dial(own: set[str], foreign: set[str]) -> str | None:
    """The address to dial among those the owner listens on, leaving out any that another
    process listens on too (SO_REUSEPORT: the kernel would hand it some of the requests),
    as the supervisor's readiness does; IPv4 first. (A foreign `::` next to an own
    127.0.0.1 is IPv6-only, or loses to the exact address in the kernel's lookup.)"""
    taken = {dial_host({a}) for a in foreign}
    hosts = {dial_host({a}) for a in own} - taken
    return dial_host({h.strip("[]") for h in hosts if h})
