"""A service's process group: spawned in a session of its own, watched without reaping its
leader (so its pid and group id stay ours until the whole group is gone), stopped with
SIGTERM, a grace, then SIGKILL (devd/signals.py), and its record kept in the state dir so
a daemon that died (kill -9) is followed by one that stops what it left running."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from devd import processes, signals

log = logging.getLogger("devd")
TOKEN = "DEVD_SERVICE_TOKEN"  # in every service's environment: how a leftover is known


@dataclass
class Group:
    """A running service command: its leader (sh -c) and the token in its environment."""

    proc: subprocess.Popen[bytes]
    leader: signals.Target
    token: str

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def exit_status(self) -> int | None:
        """The leader's exit status once it has exited (-N: killed by signal N), without
        reaping it: the zombie keeps the pid and the group id from being reused."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def stop(self, timeout: float) -> str:
        """Stop the whole group, then reap the leader; how it ended."""
        try:
            outcome = signals.stop_group(self.leader, timeout)
        except signals.Refused as exc:
            log.warning("service group %d: %s", self.pgid, exc)
            outcome = f"not signalled: {exc}"
        self.reap()
        return outcome

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            self.proc.wait(0.5)


def spawn(command: str, cwd: Path, env: dict[str, str], log_fd: int) -> Group:
    """`sh -c COMMAND` in a new session (its own process group), output to the log."""
    token = secrets.token_hex(12)
    proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, env=env | {TOKEN: token},
                            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                            start_new_session=True, close_fds=True)
    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        started = 0.0  # exited and reaped by nobody yet: waitid still sees it
    return Group(proc, signals.Target(proc.pid, started), token)


class Listeners:
    """Who listens where, taken once per watch tick for every starting service.

    On Linux from /proc/net/tcp{,6}, then (only when a group is asked about) the process
    groups, then only the fds of the groups asked about, in that order (a socket in the
    table was made before its owner was listed); psutil's socket table reads every
    process's fds, ten times the cost. The table alone is a few files: what each fast
    tick reads while a service starts."""

    def __init__(self) -> None:
        self.sockets = processes.listen_sockets()
        self.table = None if self.sockets is None else {
            inode: port for inode, (_, port) in self.sockets.items()}
        self.every: set[int] = set(self.table.values()) if self.table is not None else set()
        self.pids: dict[int, int | None] = {}
        self._by_group: dict[int, list[int]] | None = None
        self._inodes_of: dict[int, set[str]] = {}
        if self.table is None:  # no /proc (macOS): psutil's table, pids included
            self.pids = processes.listener_pids()
            self.every = set(self.pids)

    @property
    def by_group(self) -> dict[int, list[int]]:
        """Every process group's pids, listed once (the first time it is needed)."""
        if self._by_group is None:
            self._by_group = {}
            for pid in psutil.pids():
                with contextlib.suppress(OSError):
                    self._by_group.setdefault(os.getpgid(pid), []).append(pid)
        return self._by_group

    def of_group(self, pgid: int) -> set[int]:
        """The TCP ports processes of group `pgid` listen on."""
        if self.table is None:
            return {port for port, pid in self.pids.items()
                    if pid is not None and _in_group(pid, pgid)}
        return {port for inode, port in self.table.items() if inode in self._inodes(pgid)}

    def addresses_of(self, pgid: int, port: int) -> set[str]:
        """The addresses processes of group `pgid` listen on at `port` (none known without
        /proc: macOS)."""
        if self.sockets is None:
            return set()
        return {address for inode, (address, at) in self.sockets.items()
                if at == port and inode in self._inodes(pgid)}

    def others_at(self, pgid: int, port: int) -> set[str]:
        """The addresses other processes (not of group `pgid`) listen on at `port`: one
        sharing it with SO_REUSEPORT takes part of what is meant for the group."""
        if self.sockets is None:
            return set()
        return {address for inode, (address, at) in self.sockets.items()
                if at == port and inode not in self._inodes(pgid)}

    def _inodes(self, pgid: int) -> set[str]:
        if pgid not in self._inodes_of:
            self._inodes_of[pgid] = {i for pid in self.by_group.get(pgid, [])
                                     for i in processes.socket_inodes(pid)}
        return self._inodes_of[pgid]


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False


def record(path: Path, group: Group) -> None:
    """Written while the group runs, removed when devd stopped it."""
    path.write_text(json.dumps({"pgid": group.pgid, "started": group.leader.create_time,
                                "token": group.token, "daemon": os.getpid()}))


def forget(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def sweep(root: Path, timeout: float) -> int:
    """Stop what services a previous daemon left running (it died without stopping them):
    the processes of each recorded group that carry its token. Returns how many records."""
    records = list(root.glob("*/*.pid")) if root.is_dir() else []
    for path in records:
        try:
            data = json.loads(path.read_text())
            pgid, token = int(data["pgid"]), str(data["token"])
        except (OSError, ValueError, KeyError, TypeError):
            forget(path)
            continue
        left = [t for t in signals.group_members(pgid) if _carries(t.pid, token)]
        if left:
            log.warning("stopping %d process(es) of service %s left by a previous daemon",
                        len(left), path.stem)
            signals.stop_all(left, timeout)
        forget(path)
    return len(records)


def _carries(pid: int, token: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(TOKEN) == token
    except psutil.Error:
        return False


def dial_host(addresses: set[str]) -> str | None:
    """Where the proxy reaches a listener bound to `addresses`: its own loopback for a
    wildcard (0.0.0.0 → 127.0.0.1, :: → [::1]), else the address itself, IPv4 first. Never
    `localhost`: that name has both families, and the one the owner does not listen on
    may be held by another local user."""
    def rank(address: str) -> tuple[int, str]:
        return (":" in address, address)
    for address in sorted(addresses, key=rank):
        if address.startswith("::ffff:") and "." in address:
            address = address[7:]  # an IPv4-mapped address: the IPv4 one
        if address == "0.0.0.0":
            return "127.0.0.1"
        if address == "::":
            return "[::1]"
        return f"[{address}]" if ":" in address else address
    return None
