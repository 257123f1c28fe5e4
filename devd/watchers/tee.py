"""`devd run`'s pass-through: the command keeps devd run's pid (exec), while a forked
scanner tees its stdout/stderr unchanged and reports known break lines to the daemon.

Why not spawn the command as a child: the pid `devd run` reports, the exit status and
signal delivery then all stay the command's own, as before (ports, kill-port and shells
rely on that). A TTY stays a TTY: the command writes to a pty whose output the scanner
copies to the real terminal byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
from collections.abc import Callable
from typing import NoReturn

from devd.watchers.signatures import LineScanner, Signature

Report = Callable[[Signature, str], None]
# (fd the command writes to, read end for the scanner, write end for the command)
Channel = tuple[int, int, int]
HINT = b"devd: that line means the watcher stopped seeing changes; run `devd doctor`\n"


def exec_scanned(argv: list[str], env: dict[str, str], report: Report) -> NoReturn | int:
    """Fork the scanner, point fds 1 and 2 at it, then exec the command in this process."""
    channels = _channels()
    if os.fork() == 0:
        code = 0
        try:
            _scan(channels, report)
        except BaseException:  # the scanner must never fall back into the parent's code
            code = 1
        finally:
            os._exit(code)
    for target, _, write_end in channels:
        os.dup2(write_end, target)
    for fd in {fd for _, r, w in channels for fd in (r, w)}:
        os.close(fd)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"devd: error: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def _channels() -> list[Channel]:
    """A pty for a terminal (one for both when stdout and stderr are the same terminal),
    a pipe otherwise; a closed fd is left alone."""
    ttys = [fd for fd in (1, 2) if _isatty(fd)]
    channels: list[Channel] = []
    if ttys == [1, 2] and os.fstat(1).st_rdev == os.fstat(2).st_rdev:
        master, slave = _pty(1)
        return [(1, master, slave), (2, master, slave)]
    for fd in (1, 2):
        if not _valid(fd):
            continue
        read_end, write_end = _pty(fd) if fd in ttys else os.pipe()
        channels.append((fd, read_end, write_end))
    return channels


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _pty(like: int) -> tuple[int, int]:
    """A pty sized like the terminal on `like`, passing bytes through unchanged (no OPOST:
    the real terminal does its own output processing)."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    _copy_size(like, master)
    return master, slave


def _copy_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


def _resize(readers: dict[int, int]) -> None:
    for read_end, target in readers.items():
        _copy_size(target, read_end)


def _scan(channels: list[Channel], report: Report) -> None:
    """Copy each read end to its fd until every writer is gone; report signature lines."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)  # the command decides; we drain to the end
    readers = {r: t for t, r, _ in channels}
    if any(_isatty(t) for t in readers.values()):
        signal.signal(signal.SIGWINCH, lambda *_: _resize(readers))
    for fd in {w for _, _, w in channels}:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    scanners = {r: LineScanner() for r in readers}
    alive = set(readers.values())
    while readers:
        ready, _, _ = select.select(list(readers), [], [])
        for fd in ready:
            _pump(fd, readers, scanners, alive, report)


def _pump(fd: int, readers: dict[int, int], scanners: dict[int, LineScanner],
          alive: set[int], report: Report) -> None:
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # EIO: a pty whose last writer closed
        chunk = b""
    target = readers[fd]
    hits = scanners[fd].feed(chunk) if chunk else scanners[fd].close()
    if chunk and target in alive and not _write_all(target, chunk):
        alive.discard(target)  # the terminal went away: keep draining, keep scanning
    if not chunk:
        del readers[fd]
    for signature, line in hits:
        if target in alive:
            _write_all(2 if 2 in alive else target, HINT)
        report(signature, line)


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return False
    return True
