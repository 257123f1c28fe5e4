"""A small job runner for long installs: one job per worktree, a few worktrees at a time.

- One job per worktree: an flock on a lock file in the state dir, so two installs never
  touch one tree (flock is per open file, so it excludes threads of this daemon too).
- Concurrent across worktrees up to a limit (default: the number of cores).
- Every command's output goes to the worktree's log file in the state dir.
- A command is stopped (its whole process group) on timeout, or as soon as the worktree
  is deleted under it, so nothing goes on writing into a path that no longer exists.
- A command outlives a daemon that dies (kill -9, OOM) and is adopted by the next one:
  it inherits the lock's descriptor, so the worktree stays locked exactly as long as the
  package manager runs, and it writes to the log file itself (a pipe to a dead daemon would
  kill it half-way). The lock file names it (pid and start time), so the next daemon
  reports "installing (from the previous daemon)", waits, and stops it, re-verified,
  once it is past the timeout. (PR_SET_PDEATHSIG was the other way: it kills only the
  direct child, and its children would go on writing into the tree unlocked.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from devd.errors import DevdError
from devd.paths import flock_held

POLL = 0.2
TAIL_LINES = 20


class JobStopped(DevdError):
    """A command was stopped before it finished (timeout, or the worktree was deleted)."""

    code = "job_stopped"


@dataclass
class Job:
    """One worktree's turn: its log, and a liveness test checked while commands run."""

    log_path: Path
    alive: Callable[[], bool]
    log: IO[str]
    lock_fd: int = -1
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        """Write a line of devd's own into the log (what ran, how it ended)."""
        self.log.write(f"[devd {time.strftime('%H:%M:%S')}] {text}\n")
        self.log.flush()

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float,
            on_line: Callable[[str], None] | None = None,
            on_tick: Callable[[float], None] | None = None) -> int:
        """Run one command to its end; its output goes to the log (and to `on_line`)."""
        self.note(f"$ {' '.join(argv)}  (in {cwd})")
        follow = _Follower(self.log_path, on_line)
        try:
            proc = self._spawn(argv, cwd, env)
            try:
                code = self._wait(proc, argv[0], timeout, _ticks(follow, on_tick))
            finally:
                _kill_group(proc)
        finally:
            follow.close()
        self.note(f"exit {code}")
        return code

    def _spawn(self, argv: list[str], cwd: Path, env: dict[str, str]
               ) -> subprocess.Popen[bytes]:
        """Start the command in its own session, holding the lock and writing the log."""
        fds = (self.lock_fd,) if self.lock_fd >= 0 else ()
        try:
            if not self.alive():
                raise FileNotFoundError(cwd)
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=self.log, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=fds)
        except FileNotFoundError:
            if not self.alive():  # deleted before the command could even start
                raise self._deleted(argv[0]) from None
            raise
        if fds:
            _name_holder(self.lock_fd, proc.pid)
        return proc

    def _deleted(self, name: str) -> JobStopped:
        self.note("the worktree was deleted: stopping")
        return JobStopped(f"{name} stopped: the worktree was deleted during the install",
                          "nothing more was written; provision the worktree again if you "
                          "recreate it")

    def _wait(self, proc: subprocess.Popen[bytes], name: str, timeout: float,
              on_tick: Callable[[float], None]) -> int:
        start = time.monotonic()
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(POLL)
            elapsed = time.monotonic() - start
            if not self.alive():
                raise self._deleted(name)
            if elapsed > timeout:
                self.note(f"timed out after {timeout:.0f} s: stopping")
                raise JobStopped(f"{name} timed out after {timeout:.0f} s; log: {self.log_path}",
                                 "raise [deps] timeout in devd.toml if the install is just "
                                 f"slow\n{tail(self.log_path)}")
            on_tick(elapsed)


class _Follower:
    """Hands the lines a command appends to the log to `on_line`, as they come."""

    def __init__(self, log_path: Path, on_line: Callable[[str], None] | None) -> None:
        self.on_line, self.rest = on_line, b""
        self.handle = open(log_path, "rb") if on_line else None  # noqa: SIM115 - one job
        if self.handle:
            self.handle.seek(0, os.SEEK_END)

    def __call__(self) -> None:
        if self.handle is None or self.on_line is None:
            return
        *lines, self.rest = (self.rest + self.handle.read()).split(b"\n")
        for line in lines:
            self.on_line(line.decode("utf-8", "replace"))

    def close(self) -> None:
        """Hand over what is left (a last line without its newline too), then let go."""
        self()
        if self.rest and self.on_line:
            self.on_line(self.rest.decode("utf-8", "replace"))
        if self.handle:
            self.handle.close()


def _ticks(follow: _Follower, on_tick: Callable[[float], None] | None
           ) -> Callable[[float], None]:
    def tick(elapsed: float) -> None:
        follow()
        if on_tick:
            on_tick(elapsed)
    return tick


def _name_holder(lock_fd: int, pid: int) -> None:
    """Write who holds the lock into the lock file, for a daemon that comes after us."""
    record = {"daemon": os.getpid(), "pid": pid, "started": _start_time(pid)}
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, json.dumps(record).encode(), 0)


def _holder(lock_file: Path) -> dict[str, Any]:
    """The last command named in a lock file ({} if none or unreadable)."""
    try:
        record = json.loads(lock_file.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _stop_holder(record: dict[str, Any]) -> bool:
    """Stop a previous daemon's command and its group, if it is still exactly that one
    (same pid, same start time, our uid): pids are reused."""
    import psutil

    try:
        proc = psutil.Process(int(record["pid"]))
        if proc.create_time() != record.get("started") or proc.uids().real != os.getuid():
            return False
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(psutil.TimeoutExpired):
            proc.wait(grace)
            return True
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, to the command and whatever it left in its process group: a
    leftover would go on writing into the tree, holding the lock it inherited."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(proc):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while _group_alive(proc) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(POLL / 4)


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """The leader runs, or a live process of ours is still in its group. (While one is,
    the kernel keeps the group's id from being reused, so killpg hits only this group.)"""
    import psutil

    if proc.poll() is None:
        return True
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False  # the group is empty: no need to look at every process
    except PermissionError:
        pass
    for pid in psutil.pids():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(pid) == proc.pid and \
                    psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
    return False


class JobRunner:
    """Hands out job slots: one per worktree at a time, `limit` worktrees at once."""

    def __init__(self, state_dir: Path, limit: int = 0) -> None:
        self.dir = state_dir
        self.limit = limit or os.cpu_count() or 1
        self._slots = threading.BoundedSemaphore(self.limit)

    def log_path(self, key: str) -> Path:
        return self.dir / f"{key}.log"

    def lock_path(self, key: str) -> Path:
        return self.dir / f"{key}.lock"

    @contextlib.contextmanager
    def job(self, key: str, alive: Callable[[], bool],
            waiting: Callable[[str], None] = lambda _: None,
            timeout: float | None = None) -> Iterator[Job]:
        """Hold the worktree's lock and a slot for the duration; output appended to its log.
        A previous daemon's command still holding the lock is waited for, and stopped once
        it has run `timeout` seconds."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked(key, waiting, timeout) as lock_fd, self._slot(waiting), \
                open(self.log_path(key), "a", encoding="utf-8", errors="replace") as log:
            job = Job(self.log_path(key), alive, log, lock_fd)
            job.note(f"job started (pid {os.getpid()})")
            yield job
            job.note(f"job finished after {time.monotonic() - job.started:.1f} s")

    @contextlib.contextmanager
    def _locked(self, key: str, waiting: Callable[[str], None], timeout: float | None
                ) -> Iterator[int]:
        fd = os.open(self.lock_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _try_lock(fd):
                self._wait_for_lock(fd, key, waiting, timeout)
            os.ftruncate(fd, 0)  # ours now: the last holder's name is stale
            yield fd
        finally:
            os.close(fd)  # releases the flock, unless a command we started still runs

    def _wait_for_lock(self, fd: int, key: str, waiting: Callable[[str], None],
                       timeout: float | None) -> None:
        record = _holder(self.lock_path(key))
        previous = _previous(record)
        waiting(f"installing (from the previous daemon, pid {record.get('pid')}); waiting "
                "for it" if previous else
                "another install of this worktree is running; waiting for it")
        while not _try_lock(fd):
            started = record.get("started")
            if previous and timeout is not None and isinstance(started, float) and \
                    time.time() - started > timeout and _stop_holder(record):
                waiting(f"the previous daemon's install ran past the {timeout:.0f} s "
                        "timeout: stopped it")
                previous = False
            time.sleep(POLL)

    @contextlib.contextmanager
    def _slot(self, waiting: Callable[[str], None]) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            waiting(f"{self.limit} install(s) already running; waiting for a free slot")
            self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    def busy(self, key: str) -> bool:
        """Whether a job holds this worktree's lock now (read-only probe for status)."""
        return locked(self.lock_path(key))

    def adopted(self, key: str) -> bool:
        """Whether the lock is held by a command a previous daemon started."""
        return self.busy(key) and _previous(_holder(self.lock_path(key)))


def _previous(record: dict[str, Any]) -> bool:
    """Whether a lock's holder record names another daemon's command. An empty record is
    ours: the lock file is emptied when a job of this daemon takes it."""
    return bool(record) and record.get("daemon") != os.getpid()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def locked(lock_file: Path) -> bool:
    """Whether some job holds the flock on `lock_file` now."""
    return flock_held(lock_file)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in text[-lines:])
