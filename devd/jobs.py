"""A small job runner for long installs: one job per worktree, a few worktrees at a time.

- One job per worktree: an flock on a lock file in the state dir, so two installs never
  touch one tree (flock is per open file, so it excludes threads of this daemon too).
- Concurrent across worktrees up to a limit (default: the number of cores).
- Every command's output goes to the worktree's log file in the state dir.
- A command is stopped (its whole process group) on timeout, or as soon as the worktree
  is deleted under it, so nothing goes on writing into a path that no longer exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")
        reader = threading.Thread(target=self._pump, args=(proc, on_line), daemon=True)
        reader.start()
        try:
            code = self._wait(proc, argv[0], timeout, on_tick)
        finally:
            _kill_group(proc)
            reader.join(timeout=5)
        self.note(f"exit {code}")
        return code

    def _pump(self, proc: subprocess.Popen[str], on_line: Callable[[str], None] | None) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.write(line)
            if on_line:
                on_line(line.rstrip("\n"))
        self.log.flush()

    def _wait(self, proc: subprocess.Popen[str], name: str, timeout: float,
              on_tick: Callable[[float], None] | None) -> int:
        start = time.monotonic()
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(POLL)
            elapsed = time.monotonic() - start
            if not self.alive():
                self.note("the worktree was deleted: stopping")
                raise JobStopped(f"{name} stopped: the worktree was deleted during the install",
                                 "nothing more was written; provision the worktree again "
                                 "if you recreate it")
            if elapsed > timeout:
                self.note(f"timed out after {timeout:.0f} s: stopping")
                raise JobStopped(f"{name} timed out after {timeout:.0f} s; log: {self.log_path}",
                                 "raise [deps] timeout in devd.toml if the install is just "
                                 f"slow\n{tail(self.log_path)}")
            if on_tick:
                on_tick(elapsed)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, to the command and every child it started (its session)."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return


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
            waiting: Callable[[str], None] = lambda _: None) -> Iterator[Job]:
        """Hold the worktree's lock and a slot for the duration; output appended to its log."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked(key, waiting), self._slot(waiting), \
                open(self.log_path(key), "a", encoding="utf-8", errors="replace") as log:
            job = Job(self.log_path(key), alive, log)
            job.note(f"job started (pid {os.getpid()})")
            yield job
            job.note(f"job finished after {time.monotonic() - job.started:.1f} s")

    @contextlib.contextmanager
    def _locked(self, key: str, waiting: Callable[[str], None]) -> Iterator[None]:
        fd = os.open(self.lock_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting("another install of this worktree is running; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

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
