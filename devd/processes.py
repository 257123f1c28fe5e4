"""Who holds a port, which worktree a process belongs to, and stopping only our own."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from devd.errors import DevdError, NotOwner
from devd.registry import Registry, Worktree


@dataclass(frozen=True)
class Holder:
    """A process listening on a port."""

    pid: int | None  # None when the socket belongs to a process we may not inspect
    command: str
    cwd: str | None
    exe: str | None
    uid: int | None


def listeners() -> dict[int, Holder]:
    """Every TCP port something listens on, with its holder (one pass over the socket table)."""
    found: dict[int, Holder] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            port = conn.laddr.port
            if port not in found or found[port].pid is None:
                found[port] = describe(conn.pid)
    return found


def describe(pid: int | None) -> Holder:
    if pid is None:
        return Holder(None, "?", None, None, None)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return Holder(pid, proc.name(), _safe(proc.cwd), _safe(proc.exe), proc.uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return Holder(pid, "?", None, None, None)


def _safe(getter: object) -> str | None:
    try:
        return str(getter())  # type: ignore[operator]
    except (psutil.Error, OSError):
        return None


def owner_of(holder: Holder, worktrees: list[Worktree], registry: Registry) -> Worktree | None:
    """The registered worktree a process belongs to: by cwd or executable inside it (deepest
    match, since worktrees can nest), else by descent from a process `devd run` started."""
    live = [wt for wt in worktrees if wt.state != "gone"]
    for path in (holder.cwd, holder.exe):
        match = deepest_containing(path, live)
        if match:
            return match
    return _started_by_run(holder.pid, registry, {wt.id: wt for wt in live})


def deepest_containing(path: str | None, worktrees: list[Worktree]) -> Worktree | None:
    if not path:
        return None
    target = Path(path)
    inside = [wt for wt in worktrees if target == wt.path or wt.path in target.parents]
    return max(inside, key=lambda wt: len(wt.path.parts), default=None)


def _started_by_run(pid: int | None, registry: Registry,
                    by_id: dict[str, Worktree]) -> Worktree | None:
    if pid is None:
        return None
    recorded = {(p, round(t, 2)): wt_id for p, t, wt_id in registry.processes()}
    try:
        chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
        for proc in chain:
            wt_id = recorded.get((proc.pid, round(proc.create_time(), 2)))
            if wt_id in by_id:
                return by_id[wt_id]
    except psutil.Error:
        return None
    return None


def terminate(holder: Holder, timeout: float) -> str:
    """SIGTERM, then SIGKILL after `timeout`; returns how it ended."""
    assert holder.pid is not None
    try:
        proc = psutil.Process(holder.pid)
        proc.terminate()
        if _exited(proc, timeout):
            return "terminated"
        proc.kill()
        _exited(proc, timeout)
        return "killed"
    except psutil.NoSuchProcess:
        return "already exited"
    except psutil.AccessDenied as exc:
        raise NotOwner(f"not permitted to signal pid {holder.pid}", "") from exc


def _exited(proc: psutil.Process, timeout: float) -> bool:
    """Wait for a process that is not our child: a zombie counts as exited, since its
    parent may take its time to reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def check_killable(port: int, holder: Holder, owner: Worktree | None, asked: Worktree) -> None:
    """Refuse unless the holder is ours: same uid and inside the worktree that asked."""
    if holder.pid is None or holder.uid is None:
        raise NotOwner(f"port {port} is held by a process devd may not inspect (another user?)",
                       "devd never touches another user's process")
    if holder.uid != os.getuid():
        raise NotOwner(f"port {port} is held by pid {holder.pid} `{holder.command}` of uid "
                       f"{holder.uid}, not yours", "devd never touches another user's process")
    if owner is None or owner.id != asked.id:
        where = f"worktree {owner.path}" if owner else f"no worktree (cwd {holder.cwd})"
        raise NotOwner(
            f"port {port} is held by pid {holder.pid} `{holder.command}` of {where}",
            f"run `devd kill-port {port}` from that worktree, or stop it yourself",
        )


def record_run(registry: Registry, pid: int, wt_id: str) -> None:
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess as exc:
        raise DevdError(f"process {pid} exited before devd could record it", "") from exc
    registry.add_process(pid, round(create_time, 2), wt_id, psutil.Process(pid).cmdline())


def prune_runs(registry: Registry) -> None:
    """Forget recorded `devd run` processes that have exited."""
    for pid, create_time, _ in registry.processes():
        try:
            alive = round(psutil.Process(pid).create_time(), 2) == create_time
        except psutil.Error:
            alive = False
        if not alive:
            registry.drop_process(pid, create_time)
