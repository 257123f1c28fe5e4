"""The sampling thread: cheap pass every few seconds, full pass less often and on demand;
levels, per-worktree state, warnings when a level is crossed, and `devd run`'s preflight."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from devd.registry import Registry, Worktree
from devd.settings import Settings, load_repo_config
from devd.watchers import (
    Consumer,
    Sample,
    Sampler,
    alerts,
    analysis,
    default_sampler,
)
from devd.watchers.analysis import Owner, Run, Thresholds
from devd.watchers.breaks import SERVICE, Break, Breaks
from devd.watchers.estimate import Estimate, estimate
from devd.watchers.idle import IdleStopper
from devd.watchers.linux import kernel_dev

log = logging.getLogger("devd")
ESTIMATE_TTL = 300.0  # walking a big worktree costs; its size changes slowly
INDEX_TTL = 120.0
TOP = 10


@dataclass
class View:
    """A full pass with its decisions, as status and doctor show it."""

    sample: Sample
    level: str
    reasons: list[str]
    owners: dict[int, Owner]
    tags: dict[int, set[str]]


class WatcherMonitor:
    """A stoppable thread that waits on an Event between passes, like RepoWatcher."""

    def __init__(self, registry: Registry, settings: Settings,
                 sampler: Sampler | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.thresholds = Thresholds(
            settings.watchers_watches_warn, settings.watchers_watches_critical,
            settings.watchers_instances_warn, settings.watchers_instances_critical,
            settings.watchers_fds_warn)
        self.sampler = sampler or default_sampler()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self._view: View | None = None
        self._instances_key: frozenset[tuple[int, int, int]] = frozenset()
        self._announced = "ok"
        self.records = Breaks(registry)  # in the registry: they outlive the daemon
        self.idle = IdleStopper(self)
        self._estimates: dict[str, tuple[float, Estimate]] = {}
        self._index: tuple[float, dict[tuple[int, int], tuple[str, str]]] = (0.0, {})
        self._boot = psutil.boot_time()
        self._thread = threading.Thread(target=self._loop, name="devd-watchers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- cadence -----------------------------------------------------------------

    def _loop(self) -> None:
        next_full = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_full or self._changed():
                    self.idle.check(self.refresh(max_age=0.0))
                    next_full = time.monotonic() + self.settings.watchers_full_interval
            except Exception:  # the daemon must outlive a bad pass; the log says what
                log.exception("watcher sampling failed")
            if self._wake.wait(self.settings.watchers_cheap_interval):
                self._wake.clear()
                next_full = 0.0

    def _changed(self) -> bool:
        """Cheap pass: did any process open or close an inotify instance since the last full?"""
        cheap = self.sampler.sample(full=False)
        return _instances_key(cheap) != self._instances_key

    def refresh(self, max_age: float = 2.0) -> View:
        """The latest full pass, taking a new one if it is older than `max_age` seconds."""
        with self._pass_lock:
            view = self._view
            if view is None or time.time() - view.sample.at > max_age:
                view = self._full_pass()
                self._view = view
        self._announce(view)
        return view

    def latest(self) -> View:
        """The latest full pass, whatever its age (the first one is taken now)."""
        view = self._view
        return self.refresh() if view is None else view

    def peek(self) -> View | None:
        """The latest full pass, None before the first one ends (never waits for it)."""
        return self._view

    def touch(self, wt_id: str) -> None:
        """A request named this worktree: it is in use (see idle.py)."""
        self.idle.touch(wt_id)

    def nudge(self) -> None:
        """Ask for a full pass soon (e.g. a run just reported a break)."""
        self._wake.set()

    def _full_pass(self) -> View:
        sample = self.sampler.sample(full=True)
        self._instances_key = _instances_key(sample)
        level, reasons = analysis.level_of(sample, self.thresholds)
        trees = self._live()
        runs = [Run(p, t, w) for p, t, w in self.registry.processes()]
        # Declared services' runs too (devd/services/supervisor.py): devd started them.
        runs += [Run(p, t, w) for p, t, w, argv, _ in self.registry.watcher_runs()
                 if argv[:1] == [SERVICE]]
        needs_index = any(c.inodes for c in sample.consumers)
        index = self._inode_index(trees) if needs_index else {}
        owners = analysis.attribute(sample, {w.id: w.path for w in trees}, runs, index,
                                    self._boot)
        marks = {c.pid: analysis.tags(c, index) for c in sample.consumers}
        return View(sample, level, reasons, owners, marks)

    def _live(self) -> list[Worktree]:
        return [w for w in self.registry.worktrees() if w.state != "gone"]

    def _inode_index(self, trees: list[Worktree]) -> dict[tuple[int, int], tuple[str, str]]:
        """(sdev, ino) of each worktree's directories two levels deep, node_modules and .git
        tagged: enough to recognise what a watcher watches without walking everything."""
        built, index = self._index
        if time.monotonic() - built < INDEX_TTL and index:
            return index
        index = {}
        for wt in sorted(trees, key=lambda w: len(w.path.parts)):  # deeper ones win
            _index_dir(index, wt.id, str(wt.path), "", depth=2)
        self._index = (time.monotonic(), index)
        return index

    # -- what status, watchers and doctor show ---------------------------------

    def report(self, view: View | None = None) -> dict[str, Any]:
        """The top-level `watchers` block of status."""
        view = view or self.refresh()
        sample = view.sample
        watches, instances = analysis.totals(analysis.mine(sample))
        names = {w.id: str(w.path) for w in self.registry.worktrees()}
        return {
            "level": view.level, "reasons": view.reasons,
            "watches": watches, "max_watches": sample.max_watches,
            "instances": instances, "max_instances": sample.max_instances,
            "uid": sample.uid, "sampled_at": sample.at, "watch_lines": sample.watch_lines,
            "limits": sample.limits,
            "top": [self.consumer_entry(c, view, names) for c in _top(analysis.mine(sample))],
            **({"platform": sample.extra} if sample.extra else {}),
        }

    def consumer_entry(self, c: Consumer, view: View, names: dict[str, str]) -> dict[str, Any]:
        """One consumer as status and doctor show it."""
        owner = view.owners.get(c.pid)
        marks = view.tags.get(c.pid, set())
        return {
            "pid": c.pid, "command": c.command or c.name, "name": c.name,
            "watches": c.watches, "instances": c.instances, "fds": c.fds,
            "fd_limit": c.fd_limit,
            "worktree": names.get(owner.worktree_id) if owner else None,
            "attributed_by": owner.how if owner else None,
            "node_modules": "node_modules" in marks, "git": ".git" in marks,
        }

    def worktree_state(self, wt: Worktree, view: View | None = None) -> dict[str, Any]:
        """The per-worktree `watchers` block: watches, instances, the state of the
        worktree's own watchers and why; `budget` is the user's level, shared by all."""
        view = view or self.refresh()
        own = [c for c in view.sample.consumers
               if (o := view.owners.get(c.pid)) and o.worktree_id == wt.id]
        watches, instances = analysis.totals(own)
        state, reason = self._state_of(wt, own, view)
        return {"watches": watches, "instances": instances, "state": state, "reason": reason,
                "pids": sorted(c.pid for c in own), "budget": view.level}

    def _state_of(self, wt: Worktree, own: list[Consumer], view: View) -> tuple[str, str]:
        """Broken, partial, stopped or an fd limit near: this worktree's own; else ok, even
        when the budget is critical (that is every worktree's, said once in `budget`)."""
        records = self.records.by_worktree().get(wt.id, [])
        broken = [b for b in records if b.kind == "broken"]
        if broken:
            return "broken", f"pid {broken[-1].pid}: {broken[-1].line}"
        partial = self._partial(wt, own, view, records)
        if partial:
            return "partial", partial
        stopped = [b for b in records if b.kind == "stopped"]
        if stopped and not any(view.owners[c.pid].run_pid for c in own):
            return "stopped", stopped[-1].line
        for c in own:
            if c.fd_limit and c.fds >= self.thresholds.fds_warn * c.fd_limit:
                return "warn", f"pid {c.pid} has {c.fds} of {c.fd_limit} fds open"
        return "ok", ""

    def _partial(self, wt: Worktree, own: list[Consumer], view: View,
                 records: list[Break]) -> str:
        """A devd-started watcher holding clearly fewer watches than the worktree needs
        (the estimate: one per file and directory, as chokidar takes them, or per directory
        with `[watchers] estimate = "dirs"`) missed some: ENOSPC mid-walk in a tool that
        logs nothing, or skips silently. Each run is judged alone, by its processes' watches
        together (`next dev`: a parent watching its config, a child the tree), one holding
        no watch at all included (it got its inotify instance, then not one watch). Its run is
        marked `partial` in the registry, so `devd watchers --restart` can restart it."""
        settle = self.settings.watchers_settle
        started = [c for c in own if view.owners[c.pid].run_pid is not None and c.instances
                   and c.watches is not None and _age(c, self._boot) >= settle]
        need, mode = self.need(wt) if started else (0, "files")
        by_run: dict[int | None, list[Consumer]] = {}
        for c in started:
            by_run.setdefault(view.owners[c.pid].run_pid, []).append(c)
        short = [c for run in by_run.values()
                 if sum(c.watches or 0 for c in run) < self.settings.watchers_partial_ratio
                 * need for c in run]
        marked = {b.pid for b in records if b.kind == "partial"}
        if not short:
            if marked:
                self.records.clear_partial(wt.id, keep=set())
            return ""
        held = ", ".join(f"pid {c.pid} holds {c.watches}" for c in short)
        what = "dirs" if mode == "dirs" else "files and dirs"
        reason = f"devd-started watcher {held} of the ~{need} watches it needs ({what})"
        for run_pid in {view.owners[c.pid].run_pid for c in short} - marked:
            assert run_pid is not None
            self.records.record(wt.id, run_pid, "partial", "coverage", "watches", reason)
        return reason

    def need(self, wt: Worktree, max_age: float = ESTIMATE_TTL) -> tuple[int, str]:
        """How many watches a watcher of the worktree needs, and by which estimate."""
        found, mode = self.estimate(wt, max_age), estimate_mode(wt)
        return (found.dirs if mode == "dirs" else found.chokidar), mode

    def estimate(self, wt: Worktree, max_age: float = ESTIMATE_TTL) -> Estimate:
        """The chokidar-style need of a worktree, cached for a few minutes."""
        cached = self._estimates.get(wt.id)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        found = estimate(str(wt.path))
        self._estimates[wt.id] = (time.monotonic(), found)
        return found

    # -- breaks reported by `devd run` ---------------------------------------------

    def record_break(self, wt: Worktree, pid: int, signature: str, budget: str, line: str,
                     argv: list[str], cwd: str | None = None) -> None:
        """A devd-started process printed a break signature: the worktree is `broken`."""
        known = {(p, w) for p, _, w, _, _ in self.registry.watcher_runs()}
        if (pid, wt.id) not in known and argv:  # a client that did not send it at the start
            self.records.run_started(wt.id, pid, argv, cwd or str(wt.path))
        self.records.record(wt.id, pid, "broken", signature, budget, line)
        message = f"watcher of {wt.path} broke (pid {pid}, {budget}): {line}"
        log.warning("%s", message)
        alerts.notify(self.settings, "devd: file watcher broke", message)
        self.nudge()

    def run_started(self, wt: Worktree, pid: int, argv: list[str], cwd: str) -> None:
        """A new run in a worktree clears breaks of runs that have exited (it replaces them)."""
        self.records.run_started(wt.id, pid, argv, cwd)

    def breaks(self) -> dict[str, list[Break]]:
        return self.records.by_worktree()

    # -- warnings --------------------------------------------------------------

    def _announce(self, view: View) -> None:
        """On crossing a level: daemon log, desktop notification, repo hooks."""
        if view.level == self._announced:
            return
        before, self._announced = self._announced, view.level
        if view.level in ("ok", "unknown") and before in ("ok", "unknown"):
            log.info("watcher budget: %s", view.level)
            return
        text = f"watcher budget {before} → {view.level}: " + ("; ".join(view.reasons) or "ok")
        (log.warning if view.level in ("warn", "critical") else log.info)("%s", text)
        alerts.notify(self.settings, "devd: watcher budget " + view.level, text)
        for root in {w.repo_main_path for w in self._live()}:
            self._hook(root, view, before)

    def _hook(self, root: Path, view: View, before: str) -> None:
        try:
            command = load_repo_config(root).watchers.on_pressure
        except Exception as exc:  # a broken devd.toml must not stop the warnings
            log.warning("cannot read %s/devd.toml for on_pressure: %s", root, exc)
            return
        if command:
            watches, instances = analysis.totals(analysis.mine(view.sample))
            alerts.run_hook(command, root, {
                "DEVD_WATCHERS_LEVEL": view.level, "DEVD_WATCHERS_PREVIOUS": before,
                "DEVD_WATCHERS_WATCHES": str(watches if watches is not None else ""),
                "DEVD_WATCHERS_MAX_WATCHES": str(view.sample.max_watches or ""),
                "DEVD_WATCHERS_INSTANCES": str(instances),
                "DEVD_WATCHERS_REASONS": "; ".join(view.reasons)})


def estimate_mode(wt: Worktree) -> str:
    """`[watchers] estimate` of the worktree's devd.toml: "files" (chokidar) or "dirs"."""
    try:
        return load_repo_config(wt.path).watchers.estimate
    except Exception:  # a broken devd.toml is reported by provision; estimate the default
        return "files"


def _instances_key(sample: Sample) -> frozenset[tuple[int, int, int]]:
    return frozenset((c.pid, c.starttime, c.instances) for c in sample.consumers if c.instances)


def _top(consumers: list[Consumer]) -> list[Consumer]:
    holders = [c for c in consumers if c.instances]
    return sorted(holders, key=lambda c: (c.watches or 0, c.instances), reverse=True)[:TOP]


def _age(c: Consumer, boot: float) -> float:
    return time.time() - (boot + c.starttime / os.sysconf("SC_CLK_TCK"))


def _index_dir(index: dict[tuple[int, int], tuple[str, str]], wt_id: str, path: str,
               tag: str, depth: int) -> None:
    try:
        st = os.stat(path)
        index[(kernel_dev(st.st_dev), st.st_ino)] = (wt_id, tag)
        if depth <= 0:
            return
        with os.scandir(path) as entries:
            subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in subdirs:
        child_tag = tag or (entry.name if entry.name in ("node_modules", ".git") else "")
        _index_dir(index, wt_id, entry.path, child_tag, depth - 1)
