"""How many inotify watches a watcher started in a worktree will want.

chokidar (Vite, vitest, webpack-dev-server) takes one watch per directory and one per file;
directory-level watchers (watchdog, Rust notify, watchpack's directory mode) one per
directory. Both skip the usual ignores, so the estimate skips them too.
"""

from __future__ import annotations

import os
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
    dirs, files, pending = 0, 0, [root]
    while pending:
        if dirs + files >= MAX_ENTRIES:
            return Estimate(dirs, files, truncated=True)
        path = pending.pop()
        dirs += 1
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name in ignored:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        files += 1
        except OSError:
            continue
    return Estimate(dirs, files)
