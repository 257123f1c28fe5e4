"""Claude Code subagent worktrees made by devd's hook, removed when unchanged.

Natively Claude removes a subagent's worktree (`isolation: "worktree"`) as soon as the agent
ends, if it has no changes; with a WorktreeCreate hook it keeps every one ("Hook-based agent
worktree kept at ...") and never fires WorktreeRemove, so each spawn would leave a worktree,
a `worktree-agent-*` branch and a port block. The reconcile loop therefore removes a worktree
that claude-create recorded as a subagent's (devd/claude.py's mark) once it is:
- unchanged: a clean tree (files devd itself wrote do not count) and no commit since its base;
- idle: nothing ran in it, and neither it nor the subagent's transcript changed, for
  `claude_agent_grace` (a subagent still thinking keeps its transcript growing);
- not running anything: no process has its cwd or executable there.
It goes the normal way: resources released as `devd gc` does (a Postgres dump is kept), then
`git worktree remove` and the branch deleted, as Claude does. Anything else is left alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devd import leftovers
from devd.claude import read_mark
from devd.errors import DevdError
from devd.registry import Worktree

if TYPE_CHECKING:
    from devd.handlers import Service

log = logging.getLogger("devd")
GIT_TIMEOUT = 30.0
LOCAL_SETTINGS = ".claude/settings.local.json"
_warned: set[str] = set()  # worktree ids whose failed release was logged (once, not per pass)


def sweep(service: Service, grace: float, now: float | None = None) -> list[Path]:
    """Remove every due agent worktree; returns the paths removed."""
    now = time.time() if now is None else now
    removed = []
    for wt in service.registry.worktrees():
        mark = read_mark(wt.path) if wt.state not in ("gone", "provisioning") else None
        if not mark or not mark.get("agent") or last_activity(wt.path, mark) > now - grace:
            continue
        why = _kept_because(service, wt, str(mark.get("base", "")))
        if why:
            log.debug("keeping agent worktree %s: %s", wt.path, why)
            continue
        if _remove(service, wt):
            removed.append(wt.path)
    return removed


def last_activity(path: Path, mark: dict[str, Any]) -> float:
    """The latest of: its creation, the subagent's transcript (or the session's), and the
    worktree's own top-level entries (a write anywhere deeper makes it dirty anyway)."""
    times = [float(mark.get("created") or 0)]
    transcript = mark.get("transcript_path")
    if isinstance(transcript, str) and transcript:
        session = Path(transcript)
        agent = session.with_suffix("") / "subagents" / f"{mark.get('name')}.jsonl"
        times += [_mtime(agent) or _mtime(session) or 0.0]
    times += [_mtime(path / entry) or 0.0 for entry in _entries(path)]
    return max(times)


def _kept_because(service: Service, wt: Worktree, base: str) -> str | None:
    """Why the worktree must stay, or None when it may go."""
    if not base:
        return "no base commit recorded"
    status = _git(wt.path, "status", "--porcelain", "-z", "--untracked-files=all")
    ahead = _git(wt.path, "rev-list", "--count", f"{base}..HEAD")
    if status is None or ahead is None:
        return "git cannot tell whether it changed"
    ours = _written_by_devd(service, wt)
    changed = [entry[3:] for entry in status.split("\0") if entry
               and not (entry.startswith("?? ") and entry[3:] in ours)]
    if changed:
        return f"{len(changed)} changed file(s)"
    if ahead.strip() != "0":
        return f"{ahead.strip()} new commit(s)"
    running = leftovers.running([wt], service.registry).get(wt.id)
    return f"pid {running[0]['pid']} runs there" if running else None


def _written_by_devd(service: Service, wt: Worktree) -> set[str]:
    """Untracked files devd put there: its .env, the copies, Claude's local settings."""
    detail = next((r.detail for r in service.registry.resources(wt.id)
                   if r.kind == "envfile"), {})
    ours = {LOCAL_SETTINGS, *detail.get("copies", {})}
    if detail.get("file"):
        ours.add(os.path.relpath(detail["file"], wt.path))
    return ours


def _remove(service: Service, wt: Worktree) -> bool:
    try:
        service.release(wt, lambda *a, **k: None, yes=True, backup=True)
    except DevdError as exc:
        if wt.id not in _warned:
            _warned.add(wt.id)
            log.warning("agent worktree %s kept: release failed: %s", wt.path, exc.message)
        return False
    common = str(wt.repo_common_dir)
    branch = _git(wt.path, "branch", "--show-current")
    if _git(Path(common), "worktree", "remove", "--force", str(wt.path)) is None:
        log.warning("agent worktree %s released but git could not remove it", wt.path)
        return False
    if branch and branch.strip() == f"worktree-{wt.path.name}":
        _git(Path(common), "branch", "-D", branch.strip())
    log.info("removed unchanged Claude Code agent worktree %s (as Claude does natively)",
             wt.path)
    return True


def _git(cwd: Path, *args: str) -> str | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _entries(path: Path) -> list[str]:
    try:
        return [name for name in os.listdir(path) if name != ".git"]
    except OSError:
        return []


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
