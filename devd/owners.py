"""Which worktree a path belongs to: the deepest registered one containing it, unless another
checkout (a `.git` entry) sits between them. Stdlib only: the CLI uses it too."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

DELETED = " (deleted)"  # how Linux shows a process's cwd or exe whose directory was removed


class HasPath(Protocol):
    @property
    def path(self) -> Path: ...


T = TypeVar("T", bound=HasPath)


def deepest_containing(path: str | None, worktrees: Sequence[T]) -> T | None:
    """The worktree whose directory is `path` or contains it, the deepest (they can nest)."""
    if not path:
        return None
    target = Path(path)
    inside = [wt for wt in worktrees if target == wt.path or wt.path in target.parents]
    return max(inside, key=lambda wt: len(wt.path.parts), default=None)


def owning(path: str | None, worktrees: Sequence[T]) -> T | None:
    """The worktree `path` belongs to; None if an unregistered checkout nested in it holds
    the path (say .claude/worktrees/x inside the main worktree: that one is its own)."""
    path = undeleted(path)
    match = deepest_containing(path, worktrees)
    if match is None or path is None or nested_checkout_between(match.path, Path(path)):
        return None
    return match


def inside(path: Path, root: Path) -> bool:
    """Is `path` within worktree `root`'s own files (not in a checkout nested in it)?"""
    return (path == root or root in path.parents) and not nested_checkout_between(root, path)


def undeleted(path: str | None) -> str | None:
    """A /proc path without the kernel's " (deleted)" suffix: the path it had."""
    if path and path.endswith(DELETED):
        return path[: -len(DELETED)]
    return path


def nested_checkout_between(root: Path, probe: Path) -> bool:
    """True if `probe` sits in another checkout nested inside `root` (say an unregistered
    .claude/worktrees/x inside the main worktree): a .git entry between them marks it."""
    for directory in [probe, *probe.parents]:
        if directory == root:
            return False
        if os.path.lexists(directory / ".git") and not _submodule_of(root, directory):
            return True
    return False


def _submodule_of(root: Path, directory: Path) -> bool:
    """Is `directory` a submodule of `root` (its git dir under root's own `modules/`)? A
    submodule is part of the worktree's code, unlike a worktree or clone nested in it."""
    own, inner = _git_dir(root), _git_dir(directory)
    return own is not None and inner is not None and (own / "modules") in inner.parents


def _git_dir(checkout: Path) -> Path | None:
    """A checkout's own git dir: `.git` itself, or where a `.git` file points (gitdir:)."""
    dot_git = checkout / ".git"
    if dot_git.is_dir():
        return dot_git.resolve()
    try:
        with open(dot_git, encoding="utf-8", errors="replace") as handle:
            first = handle.readline(4096).strip()
    except OSError:
        return None
    if not first.startswith("gitdir:"):
        return None
    return (checkout / first.removeprefix("gitdir:").strip()).resolve()
