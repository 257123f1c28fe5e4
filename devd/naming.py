"""Stable names derived from a worktree's path, so a crashed run's leftovers are found again."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path


def slug(text: str, limit: int) -> str:
    """Lowercase ASCII letters, digits and dashes, at most `limit` characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    return "-".join(words)[:limit].strip("-")


def path_digest(path: Path, length: int = 8) -> str:
    return hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:length]


def repo_name(main_path: Path) -> str:
    return slug(main_path.name, 24) or "repo"


def worktree_id(main_path: Path, path: Path) -> str:
    """e.g. 'shop-feat-b-1a2b3c4d': readable, unique by the path's hash, stable across runs."""
    repo, leaf = repo_name(main_path), slug(path.name, 32) or "worktree"
    base = leaf if leaf.startswith(repo) else f"{repo}-{leaf}"
    return f"{base}-{path_digest(path)}"


# A snapshot's name is a directory name under devd's data dir: no separators, no dot first.
SNAPSHOT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
