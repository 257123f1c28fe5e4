"""Signals sent only to the exact process meant: pid, start time, uid and owner re-verified
immediately before each signal.

On Linux the process is pinned first with a pidfd (`pidfd_open`), then verified through
/proc, then signalled through the pidfd: if the pid was reused before the pin, the check
sees the newcomer and refuses; after the pin the kernel delivers to the pinned process or to
nobody. Elsewhere psutil's own check (start time compared before it signals) stands in,
which leaves a window of microseconds instead of none.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

# Returns why a live, verified-by-identity process must not be signalled after all (its
# owner changed, say), or None when it is still the one meant.
Check = Callable[[psutil.Process], "str | None"]
EXITED = "already exited"


@dataclass(frozen=True)
class Target:
    """The process meant: its pid and its start time (as psutil reports it)."""

    pid: int
    create_time: float


class Refused(Exception):
    """The pid no longer names the process meant, or it is not ours to signal."""


def target(proc: psutil.Process) -> Target:
    """The identity of a live process, to verify against later."""
    return Target(proc.pid, proc.create_time())


def same_start(a: float, b: float) -> bool:
    """Start times as the registry keeps them (two decimals) or as psutil reports them."""
    return round(a, 2) == round(b, 2)


def stop(meant: Target, timeout: float, check: Check | None = None,
         first: Check | None = None) -> str:
    """SIGTERM, then SIGKILL after `timeout`, each only after re-verifying (`check` before
    each, `first` too before the SIGTERM); how it ended. Raises Refused if the process is
    live but not the one meant or not ours."""
    with _pinned(meant.pid) as pin:
        if pin is None:
            return EXITED
        if not pin.send(meant, signal.SIGTERM, _both(check, first)):
            return EXITED
        if pin.wait(timeout):
            return "terminated"
        if not pin.send(meant, signal.SIGKILL, check):
            return "terminated"
        pin.wait(timeout)
        return "killed"


def send_once(meant: Target, sig: int, check: Check | None = None) -> bool:
    """One signal to the very process meant, re-verified right before it; False if that
    one exited. Raises Refused as `stop` does."""
    with _pinned(meant.pid) as pin:
        return pin is not None and pin.send(meant, sig, check)


def exited_within(meant: Target, timeout: float) -> bool:
    """Wait up to `timeout` for the process meant to exit (a zombie counts; a pid now naming
    another process means it did); True once it has."""
    with _pinned(meant.pid) as pin:
        if pin is None or verify(pin.proc, meant) == EXITED:
            return True
        return pin.wait(timeout)


def _both(check: Check | None, first: Check | None) -> Check | None:
    if check is None or first is None:
        return check or first
    return lambda proc: check(proc) or first(proc)


def stop_all(meant: list[Target], timeout: float) -> str:
    """Stop several processes at once (a run's descendants): TERM all, wait, KILL the rest."""
    with contextlib.ExitStack() as stack:
        pins = [(t, p) for t in meant if (p := stack.enter_context(_pinned(t.pid)))]
        live = [(t, p) for t, p in pins if _quietly(p, t, signal.SIGTERM)]
        if _all_exited([p for _, p in live], timeout):
            return "terminated"
        for t, p in live:
            _quietly(p, t, signal.SIGKILL)
        _all_exited([p for _, p in live], timeout)
        return "killed" if live else "terminated"


def _quietly(pin: _Pin, meant: Target, sig: int) -> bool:
    try:
        return pin.send(meant, sig, None)
    except Refused:
        return False


class _Pin:
    """One process, pinned by a pidfd where the kernel has them."""

    def __init__(self, pid: int, fd: int | None) -> None:
        self.pid, self.fd = pid, fd
        self.proc = psutil.Process(pid)  # after the pin: reads whoever holds the pid now

    def send(self, meant: Target, sig: int, check: Check | None) -> bool:
        """Verify, then signal; False if the process meant has exited."""
        why = verify(self.proc, meant, check)
        if why == EXITED:
            return False
        if why:
            raise Refused(why)
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                self.proc.send_signal(sig)  # psutil compares the start time first
        except (ProcessLookupError, psutil.NoSuchProcess):
            return False
        except (PermissionError, psutil.AccessDenied) as exc:
            raise Refused(f"not permitted to signal pid {self.pid}") from exc
        return True

    def wait(self, timeout: float) -> bool:
        """Wait for the exit; a zombie counts (its parent, not us, reaps it)."""
        if self.fd is not None:
            return bool(select.select([self.fd], [], [], max(timeout, 0.0))[0])
        return _poll_exited([self.proc], timeout)


def verify(proc: psutil.Process, meant: Target, check: Check | None = None) -> str | None:
    """None if `proc` is the live process meant and ours; EXITED if that one is gone; else
    why it must not be signalled."""
    try:
        if not same_start(proc.create_time(), meant.create_time):
            return EXITED  # the pid now names another process: the one meant has exited
        if proc.status() == psutil.STATUS_ZOMBIE:
            return EXITED
        uid = proc.uids().real
    except psutil.NoSuchProcess:
        return EXITED
    except psutil.AccessDenied:
        return f"pid {meant.pid} may not be inspected (another user's?)"
    if uid != os.getuid():
        return f"pid {meant.pid} belongs to uid {uid}, not yours"
    return check(proc) if check else None


@contextlib.contextmanager
def _pinned(pid: int) -> Iterator[_Pin | None]:
    fd: int | None = None
    try:
        fd = _pidfd_open(pid)
        pin: _Pin | None = _Pin(pid, fd)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pin = None
    try:
        yield pin
    finally:
        if fd is not None:
            os.close(fd)


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the platform or kernel has none."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or not hasattr(signal, "pidfd_send_signal"):
        return None
    try:
        return int(opener(pid))
    except ProcessLookupError:
        raise
    except OSError:
        return None  # ENOSYS (kernel < 5.3) or a sandbox that forbids it


def _all_exited(pins: list[_Pin], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(p.wait(max(0.0, deadline - time.monotonic())) for p in pins)


def _poll_exited(procs: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(_running(p) for p in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- process groups (devd's supervised services) ------------------------------


def group_members(pgid: int) -> list[Target]:
    """The live processes (zombies aside) of process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the group is empty: no need to look at every process
    except PermissionError:
        pass
    found = []
    for pid in psutil.pids():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(pid) == pgid:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(target(proc))
    return found


def stop_group(leader: Target, timeout: float) -> str:
    """SIGTERM to the process group `leader` leads, then SIGKILL after `timeout` to what
    is left of it; how it ended. The leader must be our child, not yet reaped (running or
    a zombie): while it is, neither its pid nor the group id can name anyone else. It is
    re-verified (start time, uid) right before each signal."""
    for sig, outcome in ((signal.SIGTERM, "terminated"), (signal.SIGKILL, "killed")):
        if not group_members(leader.pid):
            return EXITED if sig == signal.SIGTERM else "terminated"
        why = _leads(leader)
        if why:
            raise Refused(why)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, sig)
        if _group_gone(leader.pid, timeout):
            return outcome
    return "killed"


def _leads(leader: Target) -> str | None:
    """None if `leader` (a zombie counts) still holds its pid and is ours."""
    try:
        proc = psutil.Process(leader.pid)
        if not same_start(proc.create_time(), leader.create_time):
            return f"pid {leader.pid} is no longer the group leader devd started"
        uid = proc.uids().real
    except psutil.Error:
        return f"pid {leader.pid} is gone: its group id may be reused, so devd leaves it"
    return None if uid == os.getuid() else f"pid {leader.pid} belongs to uid {uid}"


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
