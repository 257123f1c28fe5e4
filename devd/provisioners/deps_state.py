"""What devd installed per worktree, kept in a JSON file in the state dir, and its status.

The registry's resource row says only whether the last provision of `deps` worked; this file
keeps each tree's record (tool, lock hash, strategy, time) across failures and background
jobs, so `devd status` can tell `installing`, `stale` and `symlinked` apart cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from devd.provisioners.deps_detect import TREES, lock_hash, trap

STATES = ("missing", "installing", "ready", "stale", "failed", "symlinked")
_write_guard = threading.Lock()


def state_dir(base: Path) -> Path:
    return base / "deps"


def state_file(base: Path, wt_id: str) -> Path:
    return state_dir(base) / f"{wt_id}.json"


def load(base: Path, wt_id: str) -> dict[str, dict[str, Any]]:
    """The worktree's records by key ("node", "python", ...); empty if none."""
    try:
        data = json.loads(state_file(base, wt_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update(base: Path, wt_id: str, key: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into one record and write the file atomically; returns the record."""
    with _write_guard:
        records = load(base, wt_id)
        record = {**records.get(key, {}), **fields, "updated_at": time.time()}
        records[key] = record
        _write(state_file(base, wt_id), records)
    return record


def keep_only(base: Path, wt_id: str, keys: set[str]) -> None:
    """Forget records of trees the worktree no longer has (a lockfile was removed)."""
    with _write_guard:
        records = load(base, wt_id)
        if set(records) - keys:
            _write(state_file(base, wt_id), {k: v for k, v in records.items() if k in keys})


def remove(base: Path, wt_id: str) -> None:
    for path in (state_file(base, wt_id), state_dir(base) / f"{wt_id}.log",
                 state_dir(base) / f"{wt_id}.log.1", state_dir(base) / f"{wt_id}.lock"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write(path: Path, records: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- status ------------------------------------------------------------------------


def current(worktree: Path, record: dict[str, Any], busy: bool) -> tuple[str, str]:
    """(state, note) of one recorded tree now: a stat or two, a hash only if a file changed."""
    recorded = record.get("state", "missing")
    if recorded == "installing":
        return ("installing", "") if busy else ("failed", "the install was interrupted")
    root = worktree / record.get("dir", ".")
    tree = root / TREES.get(record.get("eco", "node"), "node_modules")
    problem = trap(tree, worktree)
    if problem:
        return "symlinked", problem + "; run `devd provision --fix-deps`"
    if recorded in ("failed", "symlinked"):
        return "failed", str(record.get("error", ""))
    if not tree.is_dir() and not _plug_n_play(root, record) and not record.get("empty"):
        return "missing", f"{tree} does not exist"
    inputs = tuple(record.get("inputs", ()))
    if recorded == "ready" and lock_hash(root, inputs) != record.get("lock_hash"):
        return "stale", f"{' / '.join(inputs)} changed since the install"
    return recorded, ""


def _plug_n_play(root: Path, record: dict[str, Any]) -> bool:
    """Yarn berry's default linker installs no node_modules: .pnp.cjs maps the packages."""
    return record.get("tool") == "yarn" and (root / ".pnp.cjs").is_file()


def describe(worktree: Path, records: dict[str, dict[str, Any]], busy: bool
             ) -> dict[str, dict[str, Any]]:
    """The `deps` object of `devd status --json`."""
    shown = {}
    for key, record in records.items():
        state, note = current(worktree, record, busy)
        shown[key] = {
            "tool": record.get("tool"), "state": state, "lock_hash": record.get("lock_hash"),
            "strategy": record.get("strategy"), "seconds": record.get("seconds"),
            "saved_seconds": record.get("saved_seconds"), "dir": record.get("dir", "."),
            "note": note, "log": record.get("log"),
        }
    return shown
