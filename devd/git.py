"""What git says about a path: its worktree, the repo it belongs to, and the repo's worktrees."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devd.errors import DevdError, NotAWorktree

GIT_TIMEOUT = 15.0


@dataclass(frozen=True)
class WorktreeInfo:
    """A checked-out worktree as git sees it."""

    path: Path
    common_dir: Path
    main_path: Path
    branch: str | None  # None when HEAD is detached


@dataclass(frozen=True)
class ListedWorktree:
    """One entry of `git worktree list --porcelain`."""

    path: Path
    branch: str | None
    bare: bool
    prunable: bool


def resolve(path: Path) -> WorktreeInfo:
    """Resolve any path inside a worktree to the worktree, its repo and its branch."""
    if not path.exists():
        raise NotAWorktree(f"{path} does not exist", "pass the path of a git worktree")
    if not path.is_dir():
        path = path.parent
    out = _git(path, "rev-parse", "--is-bare-repository", "--path-format=absolute",
               "--git-common-dir", "--absolute-git-dir")
    bare, common_dir, git_dir = out.split("\n")[:3]
    if bare == "true":
        raise NotAWorktree(
            f"{path} is a bare repository, which has no working tree",
            "run devd in one of its worktrees (git worktree add ...)",
        )
    top = _git(path, "rev-parse", "--show-toplevel")
    common = Path(common_dir).resolve()
    listed = list_worktrees(common)
    main = next((w.path for w in listed if not w.bare), Path(top).resolve())
    return WorktreeInfo(Path(top).resolve(), common, main, _branch_of(Path(git_dir)))


def list_worktrees(common_dir: Path) -> list[ListedWorktree]:
    """The worktrees git knows for a repo, main first (NUL-separated, so any path is safe)."""
    out = _git(common_dir, "--git-dir", str(common_dir), "worktree", "list", "--porcelain", "-z",
               strip=False)
    entries: list[ListedWorktree] = []
    current: dict[str, str] = {}
    for field in out.split("\0"):
        if not field:
            if current:
                entries.append(_listed(current))
            current = {}
            continue
        key, _, value = field.partition(" ")
        current[key] = value
    if current:
        entries.append(_listed(current))
    return entries


def _listed(fields: dict[str, str]) -> ListedWorktree:
    branch = fields.get("branch")
    return ListedWorktree(
        path=Path(fields["worktree"]),
        branch=branch.removeprefix("refs/heads/") if branch else None,
        bare="bare" in fields,
        prunable="prunable" in fields,
    )


def _branch_of(git_dir: Path) -> str | None:
    """Read HEAD directly: cheaper than another git process, and exact for odd branch names."""
    try:
        head = (git_dir / "HEAD").read_text(encoding="utf-8", errors="surrogateescape").strip()
    except OSError:
        return None
    if head.startswith("ref: "):
        return head[5:].removeprefix("refs/heads/")
    return None


def is_ignored(worktree: Path, relpath: str) -> bool:
    """True if git ignores the path in that worktree."""
    result = subprocess.run(
        ["git", "-C", str(worktree), "check-ignore", "-q", "--", relpath],
        capture_output=True, timeout=GIT_TIMEOUT, check=False,
    )
    return result.returncode == 0


def _git(cwd: Path, *args: str, strip: bool = True) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        result = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, timeout=GIT_TIMEOUT,
            env=env, check=False,
        )
    except FileNotFoundError as exc:
        raise DevdError("git is not installed", "install git and try again", code="no_git") from exc
    except subprocess.TimeoutExpired as exc:
        raise DevdError(f"git {args[0]} in {cwd} timed out", "check the repository") from exc
    stderr = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0:
        raise NotAWorktree(f"{cwd} is not inside a git worktree ({stderr})",
                           "run devd inside a git checkout, or pass its path")
    text = result.stdout.decode(errors="surrogateescape")
    return text.strip() if strip else text
