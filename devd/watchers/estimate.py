"""How many inotify watches a watcher started in a worktree will want.

chokidar (Vite, vitest, webpack-dev-server) takes one watch per directory and one per file;
directory-level watchers (watchdog, Rust notify, watchpack's directory mode) one per
directory. Both skip the usual ignores, so the estimate skips them too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

# VCS data, dependencies and build output: the ignores dev servers ship with by default.
IGNORED = frozenset({
    ".git", ".hg", ".svn", "node_modules", "dist", "build", "out", ".next", ".nuxt",
    ".svelte-kit", ".turbo", ".cache", ".parcel-cache", "coverage", "__pycache__",
    ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "target",
})
# A walk this large is its own answer: far past any per-user budget.
MAX_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Estimate:
    """Directories and files a chokidar-style watcher would watch under a root."""

    dirs: int
    files: int
    truncated: bool = False

    @property
    def chokidar(self) -> int:
        """One watch per directory and per file."""
        return self.dirs + self.files


def estimate(root: str, ignored: frozenset[str] = IGNORED) -> Estimate:
    """Walk `root` without following symlinks, skipping ignored names; unreadable dirs count
    as one watch each (the watcher would try them too)."""
    dirs, files = 0, 0
    for _, found in walk(root, ignored):
        if dirs + files >= MAX_ENTRIES:
            return Estimate(dirs, files, truncated=True)
        dirs += 1
        files += sum(1 for entry in found if not entry.is_dir(follow_symlinks=False))
    return Estimate(dirs, files)


def walk(root: str, ignored: frozenset[str] = IGNORED
         ) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """Each directory under `root` with its entries, skipping ignored names and not following
    symlinks; an unreadable directory comes with none."""
    pending = [root]
    while pending:
        path = pending.pop()
        try:
            with os.scandir(path) as entries:
                found = [entry for entry in entries if entry.name not in ignored]
        except OSError:
            found = []
        pending += [entry.path for entry in found if entry.is_dir(follow_symlinks=False)]
        yield path, found
