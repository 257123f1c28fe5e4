"""macOS sampler (partial, labelled as such): the walls there are file descriptors, not
inotify. kqueue watchers (chokidar without fsevents, watchpack) hold one fd per watched path
against the soft RLIMIT_NOFILE (launchd's default is 256) and `kern.maxfiles`; fseventsd
slows down and rejects clients past ~1024 streams system-wide.

This module cannot run on the project's CI machines. Its parsing and decisions are tested
with recorded outputs of the real commands (tests/test_watchers.py); the per-process part
uses psutil, which the tests exercise on Linux. Reported figures:
  watches      kern.num_files     (system-wide open files: the kqueue budget)
  max_watches  kern.maxfiles
  per process  fds against the launchd soft maxfiles limit
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import psutil

from devd.watchers import Consumer, Sample

Runner = Callable[[list[str]], str]
FD_CHECK_MIN = 64  # a soft limit of 256 makes much smaller counts worth showing


def run_command(argv: list[str]) -> str:
    """The real thing on a Mac: the command's stdout, or "" when it fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def parse_sysctl(text: str) -> dict[str, int]:
    """`sysctl kern.num_files kern.maxfiles kern.maxfilesperproc` → {name: value}."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if value.strip().isdigit():
            values[name.strip()] = int(value)
    return values


def parse_launchctl_limit(text: str) -> tuple[int | None, int | None]:
    """`launchctl limit maxfiles` → (soft, hard); 'unlimited' is None."""
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["maxfiles"] and len(parts) >= 3:
            return _number(parts[1]), _number(parts[2])
    return None, None


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


class MacSampler:
    """Open files per process (psutil) and the kernel's file table, for the current user."""

    def __init__(self, run: Runner = run_command) -> None:
        self._run = run
        self.uid = os.geteuid()

    def sample(self, full: bool) -> Sample:
        kern = parse_sysctl(self._run(["sysctl", "kern.num_files", "kern.maxfiles",
                                       "kern.maxfilesperproc"]))
        soft, hard = parse_launchctl_limit(self._run(["launchctl", "limit", "maxfiles"]))
        out = Sample(time.time(), full, self.uid, kern.get("kern.maxfiles"), None)
        out.extra = {"num_files": kern.get("kern.num_files"),
                     "maxfiles": kern.get("kern.maxfiles"),
                     "maxfilesperproc": kern.get("kern.maxfilesperproc"),
                     "launchd_maxfiles": [soft, hard], "fseventsd": None}
        for proc in psutil.process_iter(["pid", "ppid", "uids", "name", "create_time"]):
            self._process(proc, out, soft)
        return out

    def _process(self, proc: psutil.Process, out: Sample, soft: int | None) -> None:
        info = proc.info
        uid = info["uids"].effective if info.get("uids") else None
        if info.get("name") == "fseventsd":
            out.extra["fseventsd"] = _usage(proc)
        if uid != self.uid:
            return
        start = int((info.get("create_time") or 0) * 100)
        out.parents[info["pid"]] = (info.get("ppid") or 0, start)
        try:
            fds = proc.num_fds()
        except psutil.Error:
            return
        if fds >= FD_CHECK_MIN:
            out.consumers.append(Consumer(info["pid"], start, info.get("ppid") or 0, uid,
                                          info.get("name") or "?", 1, fds, fds, soft,
                                          cwd=_text(proc.cwd), exe=_text(proc.exe),
                                          command=_text(lambda: " ".join(proc.cmdline())) or ""))


def _usage(proc: psutil.Process) -> dict[str, float] | None:
    """fseventsd's CPU and RSS: a busy or bloated fseventsd is the saturation sign."""
    try:
        return {"cpu_percent": proc.cpu_percent(interval=None),
                "rss_mb": proc.memory_info().rss / 2**20}
    except psutil.Error:
        return None


def _text(getter: Callable[[], str]) -> str | None:
    try:
        return str(getter())[:300]
    except (psutil.Error, OSError):
        return None
