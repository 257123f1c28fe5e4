"""Which devd instance this daemon is: a random id made once in its state dir.

Markers on shared servers (Postgres comments, Docker labels) name the instance as well as
the worktree, so two DEVD_HOMEs (or two users) on one server or engine never take each
other's objects for orphans. One daemon serves one state dir, so the id is a process-wide
fact, bound once where the daemon's Service is built and read where markers are written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from devd.errors import DevdError

FILE = "instance-id"
_VALID = re.compile(r"[0-9a-f]{16}")
_bound: str | None = None


def load(state_dir: Path) -> str:
    """The state dir's instance id, created (0600, atomically) on first use."""
    path = state_dir / FILE
    if not path.exists():
        _create(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not _VALID.fullmatch(text):
        raise DevdError(f"{path} does not hold a devd instance id",
                        "restore it from a backup; delete it only if no Postgres object or "
                        "container of this devd exists (they name the old id)",
                        code="config")
    return text


def _create(path: Path) -> None:
    # Written in full under a temp name, then linked: a crash leaves no empty id behind,
    # and of two daemons racing, the first link wins and both read the same id.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".instance-id.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(8) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def bind(state_dir: Path) -> str:
    """Load and remember this process's instance id."""
    global _bound
    _bound = load(state_dir)
    return _bound


def current() -> str:
    """The bound instance id; markers must never be written without one."""
    if _bound is None:
        raise RuntimeError("devd.instance.bind() was not called")
    return _bound
