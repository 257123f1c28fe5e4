"""`devd run`'s preflight and `devd doctor`'s recovery ladder, from the monitor's view."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from devd.owners import inside
from devd.registry import Worktree
from devd.watchers import analysis
from devd.watchers.linux import read_link
from devd.watchers.monitor import View, WatcherMonitor


def preflight(monitor: WatcherMonitor, wt: Worktree, max_watches: int | None = None,
              userns: str | None = None, limit_name: str | None = None) -> dict[str, Any]:
    """A fresh full pass and the worktree's estimated need against what is left. The client
    sends its own limit (and which sysctl it is) and user namespace: inside a container or
    `unshare -U` the limit that applies is that namespace's, and only its processes draw
    on it."""
    view = monitor.refresh(max_age=0.0)
    sample = view.sample
    found = monitor.estimate(wt, max_age=30.0)
    need, mode = monitor.need(wt, max_age=30.0)
    scope = userns if userns and userns != read_link("/proc/self/ns/user") else None
    used, instances = analysis.totals(analysis.mine(sample, scope))
    limits = [(v, name) for v, name in ((max_watches, limit_name),
                                        (sample.max_watches, sample.limits.get("watches")))
              if v]
    limit, name = min(limits, key=lambda found: found[0]) if limits else (None, None)
    result: dict[str, Any] = {
        "need": need, "dirs": found.dirs, "files": found.files, "mode": mode,
        "used": used, "limit": limit, "limit_name": name, "instances": instances,
        "max_instances": sample.max_instances, "level": view.level, "warning": None,
        "top": monitor.report(view)["top"] if scope is None else _top_in(monitor, view, scope),
    }
    if limit and used is not None:
        result["remaining"] = limit - used
        short = need > limit - used or used + need >= monitor.thresholds.watches_critical * limit
        if short:
            result["warning"] = _warning(result)
    return result


def _top_in(monitor: WatcherMonitor, view: View, userns: str) -> list[dict[str, Any]]:
    names = {w.id: str(w.path) for w in monitor.registry.worktrees()}
    held = [c for c in analysis.mine(view.sample, userns) if c.instances]
    held.sort(key=lambda c: c.watches or 0, reverse=True)
    return [monitor.consumer_entry(c, view, names) for c in held[:10]]


def _warning(pre: dict[str, Any]) -> str:
    lines = [f"this worktree may need ~{pre['need']} inotify watches "
             f"({pre['dirs']} dirs, {pre['files']} files), but only {pre['remaining']} of "
             f"{pre['limit']} are left ({pre['used']} in use)."]
    if pre["top"]:
        lines.append("stop one of these to make room:")
        lines += [f"  pid {c['pid']} {analysis.one_line(c['command'], 60)}: {c['watches']} "
                  f"watches ({c['worktree'] or 'no worktree'})" for c in pre["top"][:5]]
    name = pre.get("limit_name") or "fs.inotify.max_user_watches"
    how = "sysctl -w" if name.startswith("user.") else "sudo sysctl -w"
    lines.append(f"or raise the limit that binds: {how} {name}="
                 f"{analysis.RECOMMENDED_WATCHES} (see `devd doctor`)")
    return "\n".join(lines)


def doctor(monitor: WatcherMonitor) -> dict[str, Any]:
    """The recovery ladder: top consumers, broken and partial worktrees, the exact fix."""
    view = monitor.refresh(max_age=0.0)
    report = monitor.report(view)
    by_id = {w.id: w for w in monitor.registry.worktrees()}
    broken = [{"worktree": str(by_id[wt_id].path) if wt_id in by_id else wt_id,
               "pid": b.pid, "signature": b.signature, "budget": b.budget, "line": b.line,
               "argv": b.argv, "restart": restart_command(by_id.get(wt_id), b.argv, b.cwd)}
              for wt_id, items in monitor.breaks().items() for b in items if b.kind == "broken"]
    partial = []
    for wt in by_id.values():
        if wt.state != "gone":
            state = monitor.worktree_state(wt, view)
            if state["state"] == "partial":
                partial.append({"worktree": str(wt.path), "reason": state["reason"]})
    needed = bool(broken or partial) or view.level in ("warn", "critical")
    return {"watchers": report, "broken": broken, "partial": partial,
            "fix_needed": needed, "fix": analysis.fix(view.sample.max_watches,
                                                      view.sample.max_instances,
                                                      view.sample.limits)}


def restart_command(wt: Worktree | None, argv: list[str], cwd: str | None) -> str | None:
    """The command that restarts a failed watcher (none retries by itself): in the directory
    it ran in, when that is still the worktree's, else the worktree's root."""
    if wt is None or not argv:
        return None
    where = cwd if cwd and inside(Path(cwd), wt.path) else str(wt.path)
    return f"cd {shlex.quote(where)} && devd run -- {shlex.join(argv)}"
