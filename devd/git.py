"""What git says about a path: its worktree, the repo it belongs to, and the repo's worktrees."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devd.errors import DevdError, NotAWorktree
from devd.paths import RENAME_HINT, UNREPRESENTABLE, faithful, shown

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
    locked: bool = False  # `git worktree add` holds a lock ("initializing") until checked out


def resolve(path: Path) -> WorktreeInfo:
    """Resolve any path inside a worktree to the worktree, its repo and its branch."""
    if not path.exists():
        raise NotAWorktree(f"{shown(path)} does not exist", "pass the path of a git worktree")
    if not path.is_dir():
        path = path.parent
    # One git process for everything; --show-toplevel fails last in a bare repo.
    code, out, err = _run(path, "rev-parse", "--is-bare-repository", "--path-format=absolute",
                          "--git-common-dir", "--absolute-git-dir", "--show-toplevel")
    if out.startswith("true\n"):
        raise NotAWorktree(
            f"{shown(path)} is a bare repository, which has no working tree",
            "run devd in one of its worktrees (git worktree add ...)",
        )
    if code != 0:
        raise NotAWorktree(f"{shown(path)} is not inside a git worktree ({err})",
                           "run devd inside a git checkout, or pass its path")
    _, common_text, git_dir, top_text = _lines(out, 4, path)
    common, top = _exact(common_text), _exact(top_text)
    return WorktreeInfo(top, common, _exact(str(_main_worktree(common, top))),
                        _branch_of(Path(git_dir)))


def _exact(text: str) -> Path:
    """A real path as devd stores it, refused if devd cannot name it faithfully."""
    return Path(faithful(str(Path(text).resolve())))


def _lines(out: str, count: int, where: Path) -> list[str]:
    """Exactly `count` newline-terminated values. rev-parse has no -z: one line too many
    means a value holds a newline, and splitting it would name another directory."""
    values = out.split("\n")
    if len(values) != count + 1 or values[-1]:
        raise DevdError(f"git's answer for {shown(where)} names a path with a newline in it; "
                        "devd cannot name it exactly", RENAME_HINT, code=UNREPRESENTABLE)
    return values[:-1]


def _main_worktree(common: Path, fallback: Path) -> Path:
    """The main worktree: the parent of a `.git` dir, else the first non-bare listed one."""
    if common.name == ".git" and common.parent.is_dir():
        return common.parent
    listed = list_worktrees(common)
    return next((w.path.resolve() for w in listed if not w.bare), fallback)


def list_worktrees(common_dir: Path) -> list[ListedWorktree]:
    """The worktrees git knows for a repo, main first (NUL-separated, so any path is safe)."""
    out = _git(common_dir, "--git-dir", str(common_dir), "worktree", "list", "--porcelain", "-z")
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
        locked="locked" in fields,
    )


def _branch_of(git_dir: Path, unreadable: str | None = None) -> str | None:
    """Read HEAD directly: cheaper than another git process. Bytes that are not UTF-8 are
    shown as escapes (a branch is only ever shown: a surrogate would fail the registry and
    JSON). Opened non-blocking, as a FIFO in its place must not hang the daemon."""
    try:
        fd = os.open(git_dir / "HEAD", os.O_RDONLY | os.O_NONBLOCK)
        try:
            head = os.read(fd, 4096).decode("utf-8", "backslashreplace").strip()
        finally:
            os.close(fd)
    except OSError:
        return unreadable
    if head.startswith("ref: "):
        return head[5:].removeprefix("refs/heads/")
    return None


def branch_now(top: Path, known: str | None) -> str | None:
    """The branch checked out in the worktree at `top` now (None: a detached HEAD): a
    `git switch` there goes through no devd command. `known` when HEAD cannot be read."""
    return _branch_of(admin_dir(top) or top / ".git", unreadable=known)


def admin_dir(top: Path) -> Path | None:
    """The admin dir (<common>/worktrees/<name>) of the linked worktree at `top`, from its
    `.git` file; None for the main worktree (a `.git` directory), or a `.git` that is no
    regular file (a FIFO would block the reader), cannot be read, or is no `gitdir: `
    pointer (git's own rule for the file)."""
    dot_git = top / ".git"
    if not dot_git.is_file():
        return None
    try:
        pointer = dot_git.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    line = pointer.partition("\n")[0].rstrip("\r")
    return top / line.removeprefix("gitdir: ") if line.startswith("gitdir: ") else None


def clean_env() -> dict[str, str]:
    """The environment without GIT_* variables: a daemon started from a git hook inherits
    GIT_DIR and friends, which would point every later git command at that one repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return env | {"GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}


def _run(cwd: Path, *args: str) -> tuple[int, str, str]:
    env = clean_env()
    try:
        result = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, timeout=GIT_TIMEOUT,
            env=env, check=False,
        )
    except FileNotFoundError as exc:
        raise DevdError("git is not installed", "install git and try again", code="no_git") from exc
    except subprocess.TimeoutExpired as exc:
        raise DevdError(f"git {args[0]} in {cwd} timed out", "check the repository") from exc
    # stdout stays exact (no strip: a path may end in a space); undecodable bytes survive
    # as surrogates, so faithful() can refuse them instead of a mangled name.
    out = result.stdout.decode(errors="surrogateescape")
    return result.returncode, out, result.stderr.decode(errors="replace").strip()


def is_ignored(worktree: Path, relpath: str) -> bool:
    """True if git ignores the path in that worktree."""
    return _run(worktree, "check-ignore", "-q", "--", relpath)[0] == 0


def run(cwd: Path, *args: str) -> str:
    """Run `git -C cwd ARGS...` and return its exact output; a failure means cwd is not a
    usable worktree."""
    return _git(cwd, *args)


def _git(cwd: Path, *args: str) -> str:
    code, out, err = _run(cwd, *args)
    if code != 0:
        raise NotAWorktree(f"{cwd} is not inside a git worktree ({err})",
                           "run devd inside a git checkout, or pass its path")
    return out
