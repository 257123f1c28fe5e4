"""Claude Code subagent worktrees made by devd's hook, removed when unchanged.

Natively Claude removes a subagent's worktree (`isolation: "worktree"`) as soon as the agent
ends, if it has no changes; with a WorktreeCreate hook it keeps every one ("Hook-based agent
worktree kept at ...") and never fires WorktreeRemove, so each spawn would leave a worktree,
a `worktree-agent-*` branch and a port block. The reconcile loop therefore removes a worktree
that claude-create recorded as a subagent's (devd/claude.py's mark) once it is:
- unchanged: a clean tree (files devd itself wrote do not count) and no commit since its base;
- idle: nothing ran in it, and neither it nor the subagent's transcript changed, for
  `claude_agent_grace` (a subagent still thinking keeps its transcript growing);
- not in use: no process has its cwd, executable or an open file there.
Right before it goes, all of that is checked again, and git itself removes it only while it
is clean (no --force: devd deletes just its own untracked files first), so work started
after the first look is never lost. Then the branch goes, as Claude does, and the resources
are released as `devd gc` does for a gone worktree (a Postgres dump is kept). Anything else
is left alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from devd import leftovers
from devd.claude import read_mark
from devd.errors import DevdError
from devd.git import clean_env
from devd.registry import Worktree

if TYPE_CHECKING:
    from devd.handlers import Service

log = logging.getLogger("devd")
GIT_TIMEOUT = 30.0
LOCAL_SETTINGS = ".claude/settings.local.json"
_warned: set[str] = set()  # worktree ids whose kept removal was logged (once, not per pass)


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
        if _remove(service, wt, str(mark.get("base", ""))):
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
    changed = _changes(wt.path, base, _written_by_devd(service, wt))
    if changed:
        return changed
    running = leftovers.running([wt], service.registry).get(wt.id)
    return f"pid {running[0]['pid']} runs there" if running else _user(wt.path)


def _changes(path: Path, base: str, ours: set[str]) -> str | None:
    """What makes the worktree differ from its base, files devd wrote aside."""
    if not base:
        return "no base commit recorded"
    status = _git(path, "status", "--porcelain", "-z", "--untracked-files=all")
    ahead = _git(path, "rev-list", "--count", f"{base}..HEAD")
    if status is None or ahead is None:
        return "git cannot tell whether it changed"
    changed = [entry[3:] for entry in status.split("\0") if entry
               and not (entry.startswith("?? ") and entry[3:] in ours)]
    if changed:
        return f"{len(changed)} changed file(s)"
    return f"{ahead.strip()} new commit(s)" if ahead.strip() != "0" else None


def _user(path: Path) -> str | None:
    """A process with its cwd, executable or an open file in `path` (an editor, a shell
    someone cd'd into, a server started from elsewhere), read from /proc (without it, as
    on macOS, leftovers' cwd check is the one that holds)."""
    root = str(path.resolve())
    for pid in psutil.pids():
        if pid == os.getpid():
            continue  # the daemon's own (a watcher's) is devd's to drop with the worktree
        base = f"/proc/{pid}"
        try:
            links = ["cwd", "exe", *(f"fd/{fd}" for fd in os.listdir(f"{base}/fd"))]
        except OSError:
            continue  # gone, or another user's
        for link in links:
            try:
                target = os.readlink(f"{base}/{link}")
            except OSError:
                continue
            if target == root or target.startswith(root + "/"):
                return f"pid {pid} uses {target}"
    return None


def _written_by_devd(service: Service, wt: Worktree) -> set[str]:
    """Untracked files devd put there: its .env, the copies, Claude's local settings."""
    detail = next((r.detail for r in service.registry.resources(wt.id)
                   if r.kind == "envfile"), {})
    ours = {LOCAL_SETTINGS, *detail.get("copies", {})}
    if detail.get("file"):
        ours.add(os.path.relpath(detail["file"], wt.path))
    return ours


def _remove(service: Service, wt: Worktree, base: str) -> bool:
    """Check again, then let git remove it only while clean; release what devd held."""
    ours = _written_by_devd(service, wt)
    why = _kept_because(service, wt, base)  # still registered: leftovers sees it too
    if why:
        log.info("keeping agent worktree %s: %s (it changed since the last look)", wt.path, why)
        return False
    common = Path(wt.repo_common_dir)
    branch = (_git(wt.path, "branch", "--show-current") or "").strip()
    untracked = _git(wt.path, "ls-files", "-z", "--others", "--exclude-standard") or ""
    for rel in set(untracked.split("\0")) & ours:
        (wt.path / rel).unlink(missing_ok=True)
    if not _git_remove(common, wt.path, base, ours):
        if wt.id not in _warned:  # once, not every pass
            _warned.add(wt.id)
            log.warning("agent worktree %s kept: git would not remove it (changed meanwhile?)",
                        wt.path)
        return False
    if branch == f"worktree-{wt.path.name}":
        _git(common, "branch", "-D", branch)
    log.info("removed unchanged Claude Code agent worktree %s (as Claude does natively)",
             wt.path)
    try:
        service.release(wt, lambda *a, **k: None, yes=True, backup=True)
    except DevdError as exc:
        log.warning("agent worktree %s removed; releasing its resources failed (`devd gc` "
                    "retries): %s", wt.path, exc.message)
    return True


def _git_remove(common: Path, path: Path, base: str, ours: set[str]) -> bool:
    """`git worktree remove` without --force, which refuses anything unclean. Initialized
    submodules make it refuse a clean one too: then --force, after one more look."""
    done = _run(common, "worktree", "remove", str(path))
    if done is None or done.returncode == 0:
        return done is not None
    if "submodules" not in done.stderr or _changes(path, base, ours) or _user(path):
        return False
    return _git(common, "worktree", "remove", "--force", str(path)) is not None


def _git(cwd: Path, *args: str) -> str | None:
    done = _run(cwd, *args)
    return done.stdout if done is not None and done.returncode == 0 else None


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:  # clean_env: no inherited GIT_DIR, no index refresh racing the user, C messages
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, env=clean_env(), check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


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
