"""Postgres data directories devd keeps on the host: snapshots, and worktrees' clones of them.

    <data_dir>/postgres/snapshots/NAME/devd-snapshot.json   the marker (instance, source, major)
    <data_dir>/postgres/snapshots/NAME/pgdata/              a cleanly shut down cluster
    <data_dir>/postgres/clones/WT_ID/devd-clone.json        the marker (instance, worktree)
    <data_dir>/postgres/clones/WT_ID/pgdata/                the worktree's container's data
    <data_dir>/postgres/clones/WT_ID/before-reset-STAMP/    what a reset replaced, 7 days

A clone shares the snapshot's blocks (FICLONE on XFS/btrfs, clonefile on APFS) where the
filesystem can, so its cost does not grow with the data; elsewhere it is a plain copy and
says so. A directory without devd's marker is never touched.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devd import instance, reflink
from devd.errors import DevdError, OwnershipConflict
from devd.paths import Paths, ensure_private_dir, write_atomic

SNAPSHOT_MARKER = "devd-snapshot.json"
CLONE_MARKER = "devd-clone.json"
PGDATA = "pgdata"
BEFORE_RESET = "before-reset-"
STAMP = "%Y%m%dT%H%M%SZ"
KEEP_SECONDS = 7 * 86400
CLONE_TIMEOUT = 3600


def postgres_dir(paths: Paths, kind: str) -> Path:
    """`snapshots` or `clones` under devd's data dir (made 0700 on first use)."""
    target = paths.data_dir / "postgres" / kind
    ensure_private_dir(target.parent)
    ensure_private_dir(target)
    return target


def write_marker(directory: Path, marker: str, **fields: Any) -> None:
    """devd's marker in `directory`, written whole under a temp name, then renamed."""
    # 0600: a snapshot's marker holds the password its clones first connect with.
    write_atomic(directory / marker,
                 (json.dumps({"instance": instance.current()} | fields, indent=1) + "\n").encode())


def read_marker(directory: Path, marker: str) -> dict[str, Any] | None:
    """The marker's fields; None if `directory` does not exist. A directory without our
    marker, or with another instance's, is a conflict: devd did not make it."""
    if directory.is_symlink():
        raise OwnershipConflict(f"{directory} is a symlink, where devd makes a directory",
                                "devd never follows a link out of its data dir: move it "
                                "away yourself")
    if not directory.exists():
        return None
    try:
        fields = json.loads((directory / marker).read_text())
    except (OSError, ValueError) as exc:
        raise OwnershipConflict(f"{directory} exists without a readable devd marker ({exc})",
                                "devd never touches what it did not make: move it away "
                                "yourself") from exc
    if not isinstance(fields, dict) or fields.get("instance") != instance.current():
        raise OwnershipConflict(f"{directory} belongs to another devd instance",
                                "devd never touches what it did not make: use another name")
    return fields


def clone_tree(source: Path, target: Path) -> str:
    """Copy the tree `source` to `target` (absent), sharing blocks where the filesystem can:
    "reflink", else a plain "copy". A failure (say, a full disk) leaves no `target`."""
    sample = reflink.sample_file(source)
    shares = sample is not None and reflink.supported(sample, target.parent)
    argv = reflink.clone_command(source, target) if shares else \
        ["cp", "-a", "--", str(source), str(target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLONE_TIMEOUT,
                              check=False)
        error = done.stderr.strip() or f"exit {done.returncode}" if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error:
        remove_tree(target)
        full = "No space left" in error or "Disk quota" in error
        raise DevdError(
            f"copying {source} to {target} failed: {error.splitlines()[-1]}; nothing was kept",
            f"free space on {target.parent}'s filesystem (`df -h {target.parent}`), then "
            "provision again" if full else "fix the cause named, then provision again",
            code="disk_full" if full else "clone_failed")
    return "reflink" if shares else "copy"


def remove_tree(target: Path) -> None:
    """rm -r that accepts an absent tree (and files a container made 0700). A symlink in
    its place goes alone: what it points to is not devd's."""
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


def prune_before_reset(clone_root: Path, now: float | None = None) -> None:
    """Drop what resets replaced once it is older than a week, as dumps are. The age is the
    reset's, from the name: a renamed data dir keeps the mtime of its server's last stop, so
    a reset of a server stopped a week ago would otherwise drop what it just kept aside."""
    cutoff = (now or time.time()) - KEEP_SECONDS
    for old in clone_root.glob(BEFORE_RESET + "*"):
        try:
            kept = calendar.timegm(time.strptime(old.name[len(BEFORE_RESET):], STAMP))
        except ValueError:
            continue  # not a name devd gives: not ours to drop
        if kept < cutoff and not old.is_symlink() and old.is_dir():
            remove_tree(old)


def before_reset_name(now: float | None = None) -> str:
    """The name of what a reset at `now` keeps aside (its age, for pruning, is in it)."""
    return BEFORE_RESET + time.strftime(STAMP, time.gmtime(now))


def major_version(pgdata: Path) -> str:
    """The PostgreSQL major version a data dir was made by (its PG_VERSION file)."""
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except OSError as exc:
        raise DevdError(f"{pgdata} has no PG_VERSION: not a PostgreSQL data directory",
                        "take the snapshot again", code="snapshot_invalid") from exc


# -- disk use ----------------------------------------------------------------------------

# FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap) and the flags from <linux/fiemap.h>
FS_IOC_FIEMAP = 0xC020660B
_EXTENT_LAST, _EXTENT_SHARED = 0x1, 0x2000
_HEADER, _EXTENT, _BATCH = struct.Struct("=QQIIII"), struct.Struct("=QQQ16xI12x"), 256


def allocated(tree: Path) -> int:
    """Bytes the files under `tree` occupy on disk (st_blocks, as `du` counts); a file gone
    meanwhile (a backup in progress renames its own) counts as nothing."""
    total = 0
    for path in _files(tree):
        with contextlib.suppress(FileNotFoundError):
            total += os.lstat(path).st_blocks * 512
    return total


def unshared(tree: Path) -> int | None:
    """Bytes of the files under `tree` that share no block with another file: a clone's own
    changes. Extents the filesystem flags as shared (with the snapshot, another clone or a
    kept-aside copy) are left out. None where FIEMAP cannot say (not Linux, or a filesystem
    without it): the caller reports only what it can measure."""
    if not sys.platform.startswith("linux"):
        return None
    total = 0
    try:
        for path in _files(tree):
            total += _own_bytes(path)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            return None
        raise
    return total


def _own_bytes(path: str) -> int:
    total, start = 0, 0
    with open(path, "rb") as handle:
        while True:
            request = bytearray(_HEADER.pack(start, 2**64 - 1 - start, 0, 0, _BATCH, 0)
                                + bytes(_EXTENT.size * _BATCH))
            fcntl.ioctl(handle.fileno(), FS_IOC_FIEMAP, request)
            mapped = _HEADER.unpack_from(request)[3]
            if not mapped:
                return total
            for index in range(mapped):
                logical, _, length, flags = _EXTENT.unpack_from(
                    request, _HEADER.size + index * _EXTENT.size)
                total += 0 if flags & _EXTENT_SHARED else length
                if flags & _EXTENT_LAST:
                    return total
            start = logical + length


def _files(tree: Path) -> list[str]:
    """The regular files under `tree`, links not followed (scandir's types: no stat each)."""
    found: list[str] = []
    pending = [str(tree)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        found.append(entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except FileNotFoundError:
            continue  # gone meanwhile (a backup in progress renames its own)
    return found
