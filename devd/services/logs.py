"""Per-service log files in the state dir: `services/<worktree id>/<name>.log`, rotated.

The service writes its output to the file itself (O_APPEND), so it never depends on a pipe
into the daemon: a daemon that dies does not take its services' output with it. Rotation is
logrotate's copytruncate: past MAX_BYTES the file is copied to `.1` (older ones shift to
`.2`, ...) and truncated; an O_APPEND writer goes on at the new end. The CLI reads the
files directly (`devd logs`), so this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

MAX_BYTES = 5 << 20
KEEP = 3  # rotated files kept besides the live one
TAIL_LINES = 15


def log_dir(state_dir: Path, wt_id: str) -> Path:
    return state_dir / "services" / wt_id


def log_path(state_dir: Path, wt_id: str, name: str) -> Path:
    return log_dir(state_dir, wt_id) / f"{name}.log"


def open_for_service(path: Path) -> int:
    """An O_APPEND descriptor for the service's stdout and stderr (0600). Whatever else
    stands at the log's path (a symlink, a FIFO: devd's path, not what it leads to) is
    replaced by a new file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(path.lstat().st_mode):
            path.unlink()
    return _open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


class NotRegular(OSError):
    """The log's path is no regular file."""


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """open(2) that never follows a symlink nor blocks on a FIFO (a log swapped under a
    running service must not hang the daemon's watch thread, or be followed)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(f"{path} is no regular file")
    os.set_blocking(fd, True)
    return fd


def _read_handle(path: Path) -> BinaryIO:
    return os.fdopen(_open_regular(path, os.O_RDONLY), "rb")


def note(path: Path, text: str) -> None:
    """A line of devd's own in the log: what started, how it ended."""
    fd = open_for_service(path)
    try:
        os.write(fd, f"[devd {time.strftime('%H:%M:%S')}] {text}\n".encode())
    finally:
        os.close(fd)


def rotate_if_big(path: Path, limit: int = MAX_BYTES) -> bool:
    """Copy-truncate `path` once it passes `limit` bytes; True if it rotated."""
    try:
        found = path.lstat()  # a symlink is not followed: its target is not devd's
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(found.st_mode) or found.st_size <= limit:
        return False
    for n in range(KEEP - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    # Only the last `limit` bytes are kept: a service printing a flood (`yes`: GB/s) grows
    # its log by far more than `limit` a tick, and a whole copy of each would fill the disk.
    with open(path, "rb") as src, open(path.with_name(f"{path.name}.1"), "wb",
                                       opener=_private) as dst:
        src.seek(max(0, found.st_size - limit))
        shutil.copyfileobj(src, dst, 1 << 20)
    os.truncate(path, 0)
    return True


def _private(name: str, flags: int) -> int:
    return os.open(name, flags, 0o600)


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
    """What was appended to a log since byte `offset` (at most `limit` bytes) and the new
    offset; a log rotated (truncated) meanwhile is read from its start."""
    try:
        with _read_handle(path) as handle:
            end = handle.seek(0, os.SEEK_END)
            offset = 0 if end < offset else offset
            handle.seek(offset)
            data = handle.read(min(limit, end - offset))
    except OSError:
        return b"", offset
    return data, offset + len(data)


def tail(path: Path, lines: int = TAIL_LINES, end: int | None = None) -> list[str]:
    """The last `lines` lines of a log (up to byte `end`; only its end is read: logs grow)."""
    try:
        with _read_handle(path) as handle:
            stop = handle.seek(0, os.SEEK_END) if end is None else end
            handle.seek(max(0, stop - 64 * 1024))
            text = handle.read(stop - handle.tell()).decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines > 0 else []


def last_run(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The end of the log's last run: the lines since devd's last `start` note."""
    found = tail(path, 400)
    starts = [i for i, line in enumerate(found) if line.startswith("[devd ") and
              "] start `" in line]
    return found[starts[-1]:][-lines:] if starts else found[-lines:]


def output_of(lines: list[str]) -> list[str]:
    """The service's own lines, without devd's notes."""
    return [line for line in lines if not line.startswith("[devd ")]


def follow(path: Path, offset: int, stop: Callable[[], bool] = lambda: False,
           poll: float = 0.2) -> Iterator[str]:
    """What is appended to `path` after byte `offset`, as it comes (`devd logs -f`); a
    truncated file (rotation) is read again from its start."""
    rest = b""
    while not stop():
        now = size(path)
        if now < offset:
            offset = 0
        try:
            with _read_handle(path) as handle:
                handle.seek(offset)
                chunk = handle.read(max(0, now - offset))
        except OSError:  # gone, or no regular file: as if nothing came
            chunk = b""
        if chunk:
            offset += len(chunk)
            *done, rest = (rest + chunk).split(b"\n")
            yield from (line.decode("utf-8", "replace") for line in done)
        else:
            time.sleep(poll)
