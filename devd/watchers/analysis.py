"""Pure decisions on a Sample: totals, levels, attribution to worktrees, advice."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from devd.watchers import Consumer, Sample, worse

# The values the recovery ladder recommends; generous but far below any kernel cap.
RECOMMENDED_WATCHES = 524288
RECOMMENDED_INSTANCES = 1024
SYSCTL_DROP_IN = "/etc/sysctl.d/60-devd-inotify.conf"


@dataclass(frozen=True)
class Thresholds:
    """Fractions of a limit at which a level is reached."""

    watches_warn: float = 0.75
    watches_critical: float = 0.90
    instances_warn: float = 0.80
    instances_critical: float = 0.95
    fds_warn: float = 0.80


@dataclass(frozen=True)
class Run:
    """A process `devd run` started, as the registry recorded it."""

    pid: int
    create_time: float
    worktree_id: str


@dataclass(frozen=True)
class Owner:
    """Which worktree a consumer belongs to and how devd knows."""

    worktree_id: str
    how: str  # "cwd", "exe", "run" (ancestry) or "inode"
    run_pid: int | None = None  # the `devd run` process it descends from, if any


def mine(sample: Sample, userns: str | None = None) -> list[Consumer]:
    """Consumers charged to the sampling user (in one user namespace, if given)."""
    return [c for c in sample.consumers
            if c.uid == sample.uid and (userns is None or c.userns == userns)]


def totals(consumers: list[Consumer]) -> tuple[int | None, int]:
    """(watches or None if any is unknown, instances)."""
    instances = sum(c.instances for c in consumers)
    counted = [c.watches for c in consumers if c.instances]
    if any(w is None for w in counted):
        return None, instances
    return sum(w or 0 for w in counted), instances


def level_of(sample: Sample, th: Thresholds) -> tuple[str, list[str]]:
    """ok / unknown / warn / critical for the user's budget, with the reasons."""
    watches, instances = totals(mine(sample))
    if sample.extra:  # macOS: the system-wide file table is the budget kqueue draws on
        num_files = sample.extra.get("num_files")
        watches = num_files if isinstance(num_files, int) else None
    level, reasons = _ratio_level("watches", watches, sample.max_watches,
                                  th.watches_warn, th.watches_critical)
    if not sample.extra:  # macOS (platform figures in extra) has no instance budget
        other, more = _ratio_level("instances", instances, sample.max_instances,
                                   th.instances_warn, th.instances_critical)
        level, reasons = worse(level, other), reasons + more
    for c in mine(sample):
        if c.fd_limit and c.fds >= th.fds_warn * c.fd_limit:
            level = worse(level, "warn")
            reasons.append(f"pid {c.pid} {c.name} has {c.fds} of {c.fd_limit} fds open")
    return level, reasons


def _ratio_level(what: str, used: int | None, limit: int | None, warn: float,
                 critical: float) -> tuple[str, list[str]]:
    if used is None or not limit:
        why = "the kernel shows no watch lines" if limit else f"the {what} limit is unreadable"
        return "unknown", [f"{what}: unknown ({why})"]
    ratio = used / limit
    if ratio >= critical:
        return "critical", [f"{used} of {limit} inotify {what} in use ({ratio:.0%})"]
    if ratio >= warn:
        return "warn", [f"{used} of {limit} inotify {what} in use ({ratio:.0%})"]
    return "ok", []


def attribute(sample: Sample, worktrees: dict[str, Path], runs: list[Run],
              index: dict[tuple[int, int], tuple[str, str]], boot_time: float
              ) -> dict[int, Owner]:
    """Owner of each consumer: cwd/exe inside a worktree (deepest wins), else descent from
    a `devd run` process, else the worktree whose directories it watches."""
    owners = {}
    for c in sample.consumers:
        run = _run_ancestor(c.pid, sample, runs, boot_time)
        by_path = _by_path(c, worktrees)
        if by_path:
            owners[c.pid] = Owner(by_path[0], by_path[1], run.pid if run else None)
        elif run:
            owners[c.pid] = Owner(run.worktree_id, "run", run.pid)
        elif (by_inode := _by_inode(c, index)) is not None:
            owners[c.pid] = Owner(by_inode, "inode")
    return owners


def _by_path(c: Consumer, worktrees: dict[str, Path]) -> tuple[str, str] | None:
    for how, path in (("cwd", c.cwd), ("exe", c.exe)):
        if not path:
            continue
        target = Path(path)
        inside = [(len(p.parts), wt) for wt, p in worktrees.items()
                  if target == p or p in target.parents]
        if inside:
            return max(inside)[1], how
    return None


def _run_ancestor(pid: int, sample: Sample, runs: list[Run], boot_time: float) -> Run | None:
    by_pid = {r.pid: r for r in runs}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seen: set[int] = set()
    while pid in sample.parents and pid not in seen:
        seen.add(pid)
        ppid, start = sample.parents[pid]
        run = by_pid.get(pid)
        # pid plus start time: a recycled pid must not inherit an old run's worktree.
        if run and abs(boot_time + start / tick - run.create_time) < 1.0:
            return run
        pid = ppid
    return None


def _by_inode(c: Consumer, index: dict[tuple[int, int], tuple[str, str]]) -> str | None:
    votes = Counter(index[i][0] for i in c.inodes if i in index)
    return votes.most_common(1)[0][0] if votes else None


def tags(c: Consumer, index: dict[tuple[int, int], tuple[str, str]]) -> set[str]:
    """Which of node_modules / .git the sampled watches show it watching."""
    return {index[i][1] for i in c.inodes if i in index and index[i][1]}


def fix(max_watches: int | None, max_instances: int | None,
        limits: dict[str, str] | None = None) -> dict[str, object]:
    """The root-only fix for the limits that bind, printed and never run silently: the
    machine's sysctls, or (`limits` naming `user.*`, see linux.Limit) those of the user
    namespace the caller runs in, which only its root can raise and which last as long
    as it does."""
    names = {"watches": "fs.inotify.max_user_watches",
             "instances": "fs.inotify.max_user_instances"} | (limits or {})
    lines = [f"{names['watches']}={max(RECOMMENDED_WATCHES, max_watches or 0)}",
             f"{names['instances']}={max(RECOMMENDED_INSTANCES, max_instances or 0)}"]
    if any(name.startswith("user.") for name in names.values()):
        return {
            "binding": names, "namespace": True,
            "now": [f"sysctl -w {line}" for line in lines],
            "persist_file": None, "persist_lines": lines,
            "persist": "set them where the namespace is made (the container's entrypoint, "
                       "or right after `unshare -U`): they go with it",
        }
    return {
        "binding": names, "namespace": False,
        "now": [f"sudo sysctl -w {line}" for line in lines],
        "persist_file": SYSCTL_DROP_IN, "persist_lines": lines,
        "persist": f"printf '%s\\n' {' '.join(lines)} | sudo tee {SYSCTL_DROP_IN} "
                   "&& sudo sysctl --system",
    }


def one_line(text: str, limit: int = 120) -> str:
    """A process name or command made safe for one terminal line: no control characters."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
