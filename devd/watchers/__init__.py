"""Watcher budget: inotify (Linux) and file-descriptor (macOS) pressure, per worktree.

    backend (linux.LinuxSampler | macos.MacSampler)  →  Sample of Consumers
    monitor.WatcherMonitor   a thread: cheap pass every 5 s, full pass every 30-60 s and on
                             demand; levels, attribution to worktrees, warnings, doctor data
    estimate                 what a chokidar-style watcher in a worktree will want
    signatures               the output lines that say a watcher already broke
    tee                      `devd run`'s output pass-through that looks for them

Kept free of psutil and pydantic: the CLI imports `signatures` and `tee` from here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

LEVELS = ("ok", "unknown", "warn", "critical")


@dataclass
class Consumer:
    """One process holding inotify instances (or many fds), as one pass saw it."""

    pid: int
    starttime: int  # clock ticks after boot: with pid, names the process across passes
    ppid: int
    uid: int
    name: str
    instances: int
    watches: int | None  # None: the kernel does not say (no fdinfo watch lines)
    fds: int
    fd_limit: int | None = None  # soft RLIMIT_NOFILE; None if unlimited or unreadable
    cwd: str | None = None
    exe: str | None = None
    command: str = ""
    userns: str | None = None
    inodes: frozenset[tuple[int, int]] = frozenset()  # sampled (sdev, ino) it watches


@dataclass
class Sample:
    """The result of one pass over the process table."""

    at: float
    full: bool
    uid: int
    max_watches: int | None
    max_instances: int | None
    consumers: list[Consumer] = field(default_factory=list)
    # pid → (ppid, starttime) of every process seen, for ancestry
    parents: dict[int, tuple[int, int]] = field(default_factory=dict)
    watch_lines: bool = True  # False: this kernel prints no `inotify wd:` lines
    extra: dict[str, object] = field(default_factory=dict)  # backend-specific figures
    # The sysctl whose limit binds, per "watches"/"instances" (linux.Limit), where known.
    limits: dict[str, str] = field(default_factory=dict)


class Sampler(Protocol):
    """A platform backend: one pass over the processes of the current user."""

    def sample(self, full: bool) -> Sample: ...


def default_sampler() -> Sampler:
    """The backend for this platform, imported lazily."""
    if sys.platform == "darwin":
        from devd.watchers.macos import MacSampler

        return MacSampler()
    from devd.watchers.linux import LinuxSampler

    return LinuxSampler()


def worse(a: str, b: str) -> str:
    """The more severe of two levels."""
    return max(a, b, key=LEVELS.index)
