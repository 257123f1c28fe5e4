"""What a worktree's dependency trees are: detected from lockfiles, hashed, checked for traps.

Everything here is read-only and cheap, because `devd status` calls it for every worktree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from devd.errors import DevdError
from devd.settings import DepsConfig

# Lockfile → package manager, in the order a root with several lockfiles is decided.
NODE_LOCKS = (("pnpm-lock.yaml", "pnpm"), ("bun.lock", "bun"), ("bun.lockb", "bun"),
              ("yarn.lock", "yarn"), ("package-lock.json", "npm"),
              ("npm-shrinkwrap.json", "npm"))
# Files a package manager leaves in node_modules after a complete install (yarn: classic's,
# then berry's node-modules linker's; bun leaves none, so only devd's record can vouch).
INSTALL_MARKERS = {"npm": (".package-lock.json",), "pnpm": (".modules.yaml",),
                   "yarn": (".yarn-integrity", ".yarn-state.yml")}
TREES = {"node": "node_modules", "python": ".venv"}


@dataclass(frozen=True)
class Plan:
    """One dependency tree to install: which ecosystem, where, with which tool, from what."""

    eco: str  # "node" or "python"
    key: str  # "node", "python", or "node:<dir>" for a second root of the same ecosystem
    dir: str  # the package root, relative to the worktree
    root: Path
    tool: str  # npm, pnpm, yarn, bun, uv or pip
    mode: str  # node: "lock"; python: "sync" (uv.lock), "requirements" or "project"
    inputs: tuple[str, ...]  # files (relative to root) whose hash decides staleness

    @property
    def tree(self) -> Path:
        return self.root / TREES[self.eco]


def detect(worktree: Path, config: DepsConfig) -> list[Plan]:
    """Every tree the worktree needs, per [deps]; a root without a manifest needs nothing."""
    plans: list[Plan] = []
    for rel in config.dirs:
        root = worktree / rel
        for plan in (_node(root, rel, config.node), _python(root, rel, config.python)):
            if plan is not None:
                taken = any(p.eco == plan.eco for p in plans)
                plans.append(replace(plan, key=f"{plan.eco}:{rel}") if taken else plan)
    return plans


def _node(root: Path, rel: str, wanted: str) -> Plan | None:
    if wanted == "none" or not (root / "package.json").is_file():
        return None
    found = [(name, tool) for name, tool in NODE_LOCKS if (root / name).is_file()]
    if wanted != "auto":
        found = [(name, tool) for name, tool in found if tool == wanted]
        if not found:
            locks = " or ".join(n for n, t in NODE_LOCKS if t == wanted)
            raise DevdError(f'[deps] node = "{wanted}" but {root} has no {locks}',
                            f"commit the lockfile (run `{wanted} install` once), or set "
                            '[deps] node = "auto"', code="deps_config")
    if not found:
        return None  # no lockfile: nothing devd could install reproducibly
    name, tool = found[0]
    return Plan("node", "node", rel, root, tool, "lock", (name, "package.json"))


def _python(root: Path, rel: str, wanted: str) -> Plan | None:
    if wanted == "none":
        return None
    requirements = tuple(sorted(p.name for p in root.glob("requirements*.txt") if p.is_file()))
    if (root / "uv.lock").is_file() and wanted in ("auto", "uv"):
        return Plan("python", "python", rel, root, "uv", "sync", ("uv.lock", "pyproject.toml"))
    tool = "pip" if wanted == "pip" or (wanted == "auto" and not find_tool("uv")) else "uv"
    if requirements:
        return Plan("python", "python", rel, root, tool, "requirements", requirements)
    if _is_project(root / "pyproject.toml"):
        return Plan("python", "python", rel, root, tool, "project", ("pyproject.toml",))
    return None


def _is_project(pyproject: Path) -> bool:
    """A pyproject.toml with a [project] table is installable; a tool-config-only one is not."""
    try:
        return "project" in tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def find_tool(name: str) -> str | None:
    """The tool on PATH, or (for uv, pip-installed beside devd) next to this interpreter."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) else None


# -- lock hashes ------------------------------------------------------------------

_hash_cache: dict[str, tuple[tuple[object, ...], str]] = {}
_hash_guard = threading.Lock()


def lock_hash(root: Path, inputs: tuple[str, ...]) -> str:
    """sha256 over the input files; re-read only when a file's mtime, size or inode changed."""
    files = [root / name for name in inputs]
    key = "\0".join(str(f) for f in files)
    stamp = tuple(_stamp(f) for f in files)
    with _hash_guard:
        cached = _hash_cache.get(key)
    if cached and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"\0(absent)")
    value = digest.hexdigest()[:16]
    with _hash_guard:
        _hash_cache[key] = (stamp, value)
    return value


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


# -- the symlink trap ------------------------------------------------------------


def trap(tree: Path, worktree: Path) -> str | None:
    """Why this tree is not the worktree's own (a symlink, links into another worktree,
    a .venv copied from elsewhere), or None."""
    if tree.is_symlink():
        return f"{tree} is a symlink to {os.readlink(tree)}"
    if not tree.is_dir():
        return None
    if tree.name == ".venv":
        return _copied_venv(tree)
    for entry in _top_level(tree):
        owner = _foreign_owner(Path(os.path.realpath(entry)), worktree.resolve())
        if owner:
            return f"{entry} links into another worktree ({owner})"
    return None


def _top_level(tree: Path) -> list[str]:
    """Top-level symlinks of node_modules, scoped packages (@scope/name) included."""
    found: list[str] = []
    try:
        with os.scandir(tree) as entries:
            for entry in entries:
                if entry.is_symlink():
                    found.append(entry.path)
                elif entry.name.startswith("@") and entry.is_dir(follow_symlinks=False):
                    found += _top_level_scope(entry.path)
    except OSError:
        return found
    return found


def _top_level_scope(scope: str) -> list[str]:
    with os.scandir(scope) as entries:
        return [entry.path for entry in entries if entry.is_symlink()]


def _foreign_owner(target: Path, worktree: Path) -> Path | None:
    """The other git worktree `target` lies in; None when it is ours or in no worktree."""
    if target == worktree or worktree in target.parents:
        return None
    for parent in (target, *target.parents):
        if (parent / ".git").exists():
            return parent
    return None


def _copied_venv(venv: Path) -> str | None:
    """A venv records its own absolute path in bin/activate; another path means a copy."""
    try:
        text = (venv / "bin" / "activate").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VIRTUAL_ENV="):
            recorded = line.split("=", 1)[1].strip().strip("'\"")
            if recorded and os.path.realpath(recorded) != os.path.realpath(venv):
                return f"{venv} was copied from {recorded}"
            return None
    return None
