"""Who holds a port, which worktree a process belongs to, and stopping only our own."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from devd import signals
from devd.errors import DevdError, NotOwner
from devd.owners import deepest_containing, owning, undeleted
from devd.registry import Registry, Worktree

TICKS = 0.02  # two start-time ticks: see record_run


@dataclass(frozen=True)
class Holder:
    """A process listening on a port (or any process devd looks at)."""

    pid: int | None  # None when the socket belongs to a process we may not inspect
    command: str
    cwd: str | None  # as /proc says: ends in " (deleted)" once the directory is gone
    exe: str | None
    uid: int | None
    create_time: float | None = None  # what makes (pid, start) name one process for good


def listeners() -> dict[int, Holder]:
    """Every TCP port something listens on, with its holder (one pass over the socket table)."""
    return {port: describe(pid) for port, pid in listener_pids().items()}


def listener_pids() -> dict[int, int | None]:
    """Every TCP port something listens on and the pid holding it (None: a process devd may
    not inspect), without looking closer at the holders."""
    found: dict[int, int | None] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and \
                found.get(conn.laddr.port) is None:
            found[conn.laddr.port] = conn.pid
    return found


def all_listening_ports() -> set[int]:
    """Every TCP port something listens on, from /proc/net/tcp{,6} alone where there is
    one (no process's fds read: psutil's table reads them all, ten times the cost)."""
    table = listen_table()
    return set(table.values()) if table is not None else set(listener_pids())


def listen_table() -> dict[str, int] | None:
    """{socket inode: port} of every listening TCP socket, or None without /proc."""
    sockets = listen_sockets()
    return None if sockets is None else {inode: port for inode, (_, port) in sockets.items()}


def listen_sockets() -> dict[str, tuple[str, int]] | None:
    """{socket inode: (address, port)} of every listening TCP socket, or None without /proc."""
    found = listen_entries()
    return None if found is None else {inode: (a, p) for inode, (a, p, _) in found.items()}


def listen_entries() -> dict[str, tuple[str, int, int]] | None:
    """{socket inode: (address, port, owner's uid)} of every listening TCP socket, or None
    without /proc.

    From the kernel's sock_diag (what `ss -lt` asks: the listening sockets alone, ~0.5 ms),
    else /proc/net/tcp{,6}, which walks every socket's hash bucket: 12-25 ms a read seen
    here, too much for a readiness poll every few tens of milliseconds."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, struct.error):
            return _diag_listening()
    found: dict[str, tuple[str, int, int]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as table:
                rows = table.read().splitlines()[1:]
        except FileNotFoundError:
            if name.endswith("6"):
                continue
            return None
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].rsplit(":", 1)
                found[fields[9]] = (_address(address), int(port, 16), int(fields[7]))
    return found


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _DUMP, _TCP_LISTEN = 4, 20, 0x301, 10
_DONE, _ERROR = 3, 2  # netlink message types


def _diag_listening() -> dict[str, tuple[str, int, int]]:
    """Listening TCP sockets (IPv4 and IPv6) from NETLINK_SOCK_DIAG (linux/inet_diag.h)."""
    found: dict[str, tuple[str, int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(2.0)
        for family in (socket.AF_INET, socket.AF_INET6):
            # inet_diag_req_v2: family, protocol, ext, pad, states; an empty inet_diag_sockid.
            req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0,
                              1 << _TCP_LISTEN) + bytes(48)
            sock.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _DUMP, 1, 0)
                      + req)
            while _diag_messages(sock.recv(1 << 16), found):
                pass
    return found


def _diag_messages(data: bytes, found: dict[str, tuple[str, int, int]]) -> bool:
    """Add one recv's inet_diag_msg records to `found`; False once the dump is done."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if kind == _DONE:
            return False
        if kind == _ERROR or length < 16:
            raise OSError("sock_diag refused the dump")
        body = offset + 16  # inet_diag_msg: family, state, timer, retrans, then the sockid
        family = data[body]
        port = struct.unpack_from(">H", data, body + 4)[0]
        raw = data[body + 8: body + 8 + (4 if family == socket.AF_INET else 16)]
        uid, inode = struct.unpack_from("=II", data, body + 64)
        found[str(inode)] = (socket.inet_ntop(family, raw), port, uid)
        offset += (length + 3) & ~3
    return True


def _address(hexed: str) -> str:
    """/proc/net/tcp's address: 32-bit words, each printed in the host's byte order."""
    raw = bytes.fromhex(hexed)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open (none if it cannot be read)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found.add(link[8:-1])
    return found


def socket_holders(inodes: set[str]) -> dict[str, set[int]]:
    """{inode: every pid holding it} for the sockets asked about, from every process's fds
    this user may read (a few ms per hundred processes: only when a listener changed). All
    of them: a socket handed over (SCM_RIGHTS, socket activation) has several holders."""
    found: dict[str, set[int]] = {}
    for pid in psutil.pids():
        for inode in socket_inodes(pid) & inodes:
            found.setdefault(inode, set()).add(pid)
    return found


def established_ports() -> set[int]:
    """Local TCP ports with an established connection (someone uses what listens there)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr}


def describe(pid: int | None) -> Holder:
    """What devd can see of a process (a Holder of Nones for one it may not inspect)."""
    if pid is None:
        return Holder(None, "?", None, None, None)
    try:
        return of_process(psutil.Process(pid))
    except psutil.Error:
        return Holder(pid, "?", None, None, None)


def of_process(proc: psutil.Process) -> Holder:
    try:
        with proc.oneshot():
            return Holder(proc.pid, proc.name(), _safe(proc.cwd), _safe(proc.exe),
                          proc.uids().real, proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return Holder(proc.pid, "?", None, None, None)


def _safe(getter: object) -> str | None:
    try:
        return str(getter())  # type: ignore[operator]
    except (psutil.Error, OSError):
        return None


def owner_of(holder: Holder, worktrees: list[Worktree], registry: Registry) -> Worktree | None:
    """The registered worktree a process belongs to, gone ones included: by the (recorded)
    path of its cwd or executable (deepest match; a nested unregistered checkout is its own,
    so nobody's here), else by descent from a process `devd run` started."""
    for path in (holder.cwd, holder.exe):
        if deepest_containing(undeleted(path), worktrees) is not None:
            return owning(path, worktrees)
    return _started_by_run(holder.pid, registry, {wt.id: wt for wt in worktrees})


def _started_by_run(pid: int | None, registry: Registry,
                    by_id: dict[str, Worktree]) -> Worktree | None:
    found = nearest_run(pid, registry)
    return by_id.get(found[2]) if found else None


def run_of(pid: int | None, registry: Registry, wt_id: str) -> tuple[int, float] | None:
    """The recorded `devd run` of worktree `wt_id` that `pid` is or descends from, as
    (pid, start time)."""
    found = nearest_run(pid, registry)
    return (found[0], found[1]) if found and found[2] == wt_id else None


def nearest_run(pid: int | None, registry: Registry) -> tuple[int, float, str] | None:
    """(pid, start time, worktree id) of the nearest recorded `devd run` that `pid` is or
    descends from: the kernel's ancestry, never a client's word."""
    if pid is None:
        return None
    recorded = {(p, round(t, 2)): wt_id for p, t, wt_id in registry.processes()}
    try:
        proc = psutil.Process(pid)
        for each in [proc, *proc.parents()]:
            key = (each.pid, round(each.create_time(), 2))
            if key in recorded:
                return (*key, recorded[key])
    except psutil.Error:
        return None
    return None


def stop_holder(port: int, holder: Holder, asked: Worktree, registry: Registry,
                timeout: float) -> str:
    """Stop the holder of `port` while it is `asked`'s (see check_killable): verified again,
    through a pidfd where there is one, immediately before each signal."""
    def still_killable(proc: psutil.Process) -> str | None:
        now = of_process(proc)
        try:
            check_killable(port, now, owner_of(now, registry.worktrees(), registry), asked)
        except NotOwner as exc:
            return exc.message
        return None

    def still_listening(proc: psutil.Process) -> str | None:
        # The socket is the holder's identity beyond its start time (10 ms ticks): a pid
        # reused within one tick by a process that does not hold the port is refused.
        return None if listens_on(proc, port) else f"pid {proc.pid} no longer listens on {port}"

    return terminate(holder, timeout, still_killable, still_listening)


def listens_on(proc: psutil.Process, port: int) -> bool:
    """Does this very process (whoever holds the pid now) listen on TCP `port`?"""
    return port in listening_ports(proc)


def listening_ports(proc: psutil.Process) -> list[int]:
    """The TCP ports a process listens on (none if it cannot be read)."""
    sockets = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    try:
        return [c.laddr.port for c in sockets(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr]
    except (psutil.Error, OSError):
        return []


def terminate(holder: Holder, timeout: float, check: signals.Check | None = None,
              first: signals.Check | None = None) -> str:
    """SIGTERM, then SIGKILL after `timeout`, to the very process described; how it ended."""
    assert holder.pid is not None and holder.create_time is not None
    meant = signals.Target(holder.pid, holder.create_time)
    try:
        return signals.stop(meant, timeout, check, first)
    except signals.Refused as exc:
        raise NotOwner(f"did not signal pid {holder.pid}: {exc}",
                       "devd signals only the process it checked, and only yours") from exc


def check_killable(port: int, holder: Holder, owner: Worktree | None, asked: Worktree) -> None:
    """Refuse unless the holder is ours: same uid and inside the worktree that asked."""
    if holder.pid is None or holder.uid is None or holder.create_time is None:
        raise NotOwner(f"port {port} is held by a process devd may not inspect (another user?)",
                       "devd never touches another user's process")
    if holder.uid != os.getuid():
        raise NotOwner(f"port {port} is held by pid {holder.pid} `{holder.command}` of uid "
                       f"{holder.uid}, not yours", "devd never touches another user's process")
    if owner is None or owner.id != asked.id:
        where = f"worktree {owner.path}" if owner else f"no worktree (cwd {holder.cwd})"
        if owner and owner.state == "gone":
            where = f"gone worktree {owner.path}"
        raise NotOwner(f"port {port} is held by pid {holder.pid} `{holder.command}` of {where}",
                       refusal_hint(port, holder, owner))


def refusal_hint(port: int, holder: Holder, owner: Worktree | None) -> str:
    """What to do instead: ask from the owning worktree, or stop it by hand where there is
    no live worktree to ask from (devd stops only a worktree's own processes)."""
    if owner is not None and owner.state != "gone":
        return f"it is that worktree's: `devd kill-port {port} --path " \
            f"{shlex.quote(str(owner.path))}`"
    why = "its worktree is gone" if owner else "it runs in no worktree devd knows"
    return f"{why}, so devd leaves it alone; if it is yours, stop it: `kill {holder.pid}`"


def stop_run(registry: Registry, wt_id: str, pid: int, started: float, timeout: float) -> str:
    """Stop one `devd run` of worktree `wt_id` and its descendants, only while the registry
    records that run (records come from the kernel's peer pid, see record_run)."""
    descendants = family(pid, started)
    if descendants is None:
        return signals.EXITED
    if not _recorded(registry, wt_id, pid, started):
        return "not a recorded run"  # never signalled: no `devd run` of this worktree
    try:
        outcome = signals.stop(signals.Target(pid, started), timeout,
                               lambda _: None if _recorded(registry, wt_id, pid, started)
                               else "its run record is gone")
    except signals.Refused:
        return "not ours"  # a recorded pid now held by another user: never touched
    signals.stop_all(descendants, timeout)
    return outcome


def family(pid: int, started: float) -> list[signals.Target] | None:
    """The descendants of the live process meant (None if it is gone), listed while it
    provably lives: a reused pid's children are never taken for its own."""
    try:
        proc = psutil.Process(pid)
        if not signals.same_start(proc.create_time(), started):
            return None
        family = [signals.target(p) for p in proc.children(recursive=True)]
        return family if proc.is_running() else None
    except psutil.Error:
        return None


def _recorded(registry: Registry, wt_id: str, pid: int, started: float) -> bool:
    return (pid, round(started, 2)) in {(p, t) for p, t, w in registry.processes() if w == wt_id}


def record_run(registry: Registry, pid: int, wt_id: str,
               confirmed: Callable[[], bool] = lambda: True) -> tuple[int, float]:
    """Record `pid` (the kernel's word on who asked) as a `devd run` of the worktree;
    `confirmed`, asked after reading it, says the pid still names the process that asked."""
    key = _start_of(pid)
    # Start times have 10 ms ticks: a process that exits within its first tick leaves its
    # (pid, start) to a stranger started in that tick. Seen alive after the tick, it is
    # the only process that ever has that pair.
    time.sleep(TICKS)
    if key is None or _start_of(pid) != key or not confirmed():
        raise DevdError(f"process {pid} exited before devd could record it",
                        "`devd run` stays connected until it is recorded")
    registry.add_process(*key, wt_id, _cmdline(pid))
    return key


def _start_of(pid: int) -> tuple[int, float] | None:
    try:
        return pid, round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


class RunTokens:
    """A secret per recorded run, handed to its `devd run` only: its scanner (a child) can
    still report a break after the run itself exited and its ancestry is gone."""

    LIMIT = 1024  # runs whose scanner may still report; older ones fall back to ancestry

    def __init__(self) -> None:
        self._runs: dict[str, tuple[int, float, str]] = {}
        self._guard = threading.Lock()

    def issue(self, pid: int, started: float, wt_id: str) -> str:
        token = secrets.token_hex(16)
        with self._guard:
            self._runs[token] = (pid, started, wt_id)
            while len(self._runs) > self.LIMIT:
                self._runs.pop(next(iter(self._runs)))
        return token

    def run(self, token: object, wt_id: str) -> tuple[int, float] | None:
        """The run a token was issued for, if it is a run of `wt_id`."""
        with self._guard:
            found = self._runs.get(token) if isinstance(token, str) else None
        return (found[0], found[1]) if found and found[2] == wt_id else None


def prune_runs(registry: Registry) -> None:
    """Forget recorded `devd run` processes that have exited."""
    for pid, create_time, _ in registry.processes():
        try:
            alive = round(psutil.Process(pid).create_time(), 2) == create_time
        except psutil.Error:
            alive = False
        if not alive:
            registry.drop_process(pid, create_time)
