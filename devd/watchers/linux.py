"""Linux sampler: inotify usage per process from /proc, without root for one's own processes.

There is no per-user usage file: the kernel charges each watch to the euid that called
`inotify_init`, and shows each instance only as an `anon_inode:inotify` fd whose
/proc/PID/fdinfo/FD lists one `inotify wd:` line per watch. So a pass walks /proc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import time
from dataclasses import dataclass

from devd.watchers import Consumer, Sample

WD = b"inotify wd:"
INOTIFY_LINK = "anon_inode:inotify"
# (sdev, ino) of this many watches from each end of an fdinfo are enough to attribute it.
SAMPLE_LINES = 32
# Below this many open fds no soft limit is close; /proc/PID/limits is not worth reading.
FD_CHECK_MIN = 200
_CHUNK = 1 << 20
_FIELDS = re.compile(rb"ino:([0-9a-f]+) sdev:([0-9a-f]+) ")
FdKey = tuple[int, int, str]


class LinuxSampler:
    """One pass over /proc; remembers which fds are inotify per (pid, starttime, fd)."""

    def __init__(self, proc: str = "/proc", watch_lines: bool | None = None) -> None:
        self.proc = proc
        self.uid = os.geteuid()
        self._watch_lines = watch_lines  # None: probe the kernel on first use
        self._kinds: dict[FdKey, bool] = {}
        self._inodes: dict[FdKey, tuple[int, frozenset[tuple[int, int]]]] = {}

    def sample(self, full: bool) -> Sample:
        """A cheap pass counts inotify fds (reusing known fds); a full pass also counts watches."""
        if self._watch_lines is None:
            self._watch_lines = probe_watch_lines(self.proc)
        watches, instances = binding_limits(self.proc)
        out = Sample(time.time(), full, self.uid, watches.value if watches else None,
                     instances.value if instances else None,
                     watch_lines=self._watch_lines is not False,
                     limits=limit_names(watches, instances))
        kinds: dict[FdKey, bool] = {}
        inodes: dict[FdKey, tuple[int, frozenset[tuple[int, int]]]] = {}
        for name in os.listdir(self.proc):
            if name.isdigit():
                self._process(int(name), out, kinds, inodes)
        self._kinds = kinds
        if full:
            self._inodes = inodes
        return out

    def _process(self, pid: int, out: Sample, kinds: dict[FdKey, bool],
                 inodes: dict[FdKey, tuple[int, frozenset[tuple[int, int]]]]) -> None:
        base = f"{self.proc}/{pid}"
        try:
            uid = os.stat(base).st_uid
            if uid != self.uid:
                # Another user's: the kernel charges its watches to that user's budget, not
                # ours (even when we are root), so reading it would only cost time.
                return
            name, ppid, start = parse_stat(read_bytes(f"{base}/stat"))
            fds = os.listdir(f"{base}/fd")
        except (OSError, ValueError):
            return  # exited mid-scan, or not ours to read
        out.parents[pid] = (ppid, start)
        found = self._inotify_fds(base, pid, start, fds, out.full, kinds)
        if not found and len(fds) < FD_CHECK_MIN:
            return
        consumer = Consumer(pid, start, ppid, uid, name, len(found), None, len(fds))
        if out.full:
            self._fill(consumer, base, found, inodes)
        out.consumers.append(consumer)

    def _inotify_fds(self, base: str, pid: int, start: int, fds: list[str], full: bool,
                     kinds: dict[FdKey, bool]) -> list[str]:
        found = []
        for fd in fds:
            key = (pid, start, fd)
            kind = None if full else self._kinds.get(key)
            if kind is None:
                try:
                    kind = os.readlink(f"{base}/fd/{fd}") == INOTIFY_LINK
                except OSError:
                    continue  # closed since the listing
            kinds[key] = kind
            if kind:
                found.append(fd)
        return found

    def _fill(self, consumer: Consumer, base: str, fds: list[str],
              inodes: dict[FdKey, tuple[int, frozenset[tuple[int, int]]]]) -> None:
        """Watches and sampled inodes per inotify fd, then the process's cwd, exe, limits."""
        total, seen = 0, set[tuple[int, int]]()
        for fd in fds:
            key = (consumer.pid, consumer.starttime, fd)
            try:
                count, head, tail = read_fdinfo(f"{base}/fdinfo/{fd}")
            except OSError:
                continue  # the fd closed mid-read
            total += count
            known = self._inodes.get(key)
            if known is None or count >= 2 * max(known[0], 1):
                known = (count, sample_inodes(head, tail))
            inodes[key] = known
            seen |= known[1]
        consumer.watches = total if self._watch_lines is not False else None
        consumer.inodes = frozenset(seen)
        consumer.cwd = read_link(f"{base}/cwd")
        consumer.exe = read_link(f"{base}/exe")
        consumer.userns = read_link(f"{base}/ns/user")
        consumer.command = read_cmdline(f"{base}/cmdline") or consumer.name
        if consumer.fds >= FD_CHECK_MIN or consumer.instances:
            consumer.fd_limit = read_fd_limit(f"{base}/limits")


def parse_stat(data: bytes) -> tuple[str, int, int]:
    """(comm, ppid, starttime) from /proc/PID/stat; comm may hold spaces and parentheses."""
    close = data.rindex(b")")
    name = data[data.index(b"(") + 1:close].decode("utf-8", "replace")
    fields = data[close + 2:].split()
    return name, int(fields[1]), int(fields[19])


def read_bytes(path: str) -> bytes:
    """A whole /proc file (their size is not known in advance)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_fdinfo(path: str) -> tuple[int, bytes, bytes]:
    """Count `inotify wd:` lines chunk by chunk (150k watches are ~16 MB of text, never held
    at once); keep the first and last chunk for sampling."""
    fd = os.open(path, os.O_RDONLY)
    try:
        count, head, tail, carry = 0, b"", b"", b""
        while chunk := os.read(fd, _CHUNK):
            # The marker cannot overlap itself, so a carry shorter than it never counts twice.
            count += (carry + chunk).count(WD)
            carry = chunk[1 - len(WD):]
            head = head or chunk
            tail = chunk
        return count, head, tail if tail is not head else b""
    finally:
        os.close(fd)


def sample_inodes(head: bytes, tail: bytes) -> frozenset[tuple[int, int]]:
    """(sdev, ino) of the first and last watches; sdev is the kernel's major << 20 | minor."""
    found = set()
    for text in (head[: 200 * SAMPLE_LINES], tail[-200 * SAMPLE_LINES:]):
        for match in _FIELDS.finditer(text):
            found.add((int(match[2], 16), int(match[1], 16)))
    return frozenset(found)


def kernel_dev(st_dev: int) -> int:
    """A stat() st_dev in the kernel's internal encoding, as fdinfo's sdev shows it."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def read_cmdline(path: str) -> str:
    try:
        raw = read_bytes(path)
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")[:300]


def read_fd_limit(path: str) -> int | None:
    """The soft RLIMIT_NOFILE from /proc/PID/limits; None if unlimited or unreadable."""
    try:
        text = read_bytes(path).decode()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files"):].split()[0]
            return int(soft) if soft.isdigit() else None
    return None


def read_limits(proc: str = "/proc") -> tuple[int | None, int | None]:
    """(max watches, max instances) for this user namespace; None where unreadable."""
    watches, instances = binding_limits(proc)
    return (watches.value if watches else None, instances.value if instances else None)


@dataclass(frozen=True)
class Limit:
    """One inotify limit as a sysctl: `fs.inotify.max_user_watches` (the machine's) or
    `user.max_inotify_watches` (this user namespace's own, inside a container or
    `unshare -U`). Both apply; the lower one binds, and only raising that one helps."""

    sysctl: str
    value: int

    @property
    def path(self) -> str:
        return sysctl_path(self.sysctl)

    @property
    def namespace(self) -> bool:
        return self.sysctl.startswith("user.")


LIMITS = {"watches": ("fs.inotify.max_user_watches", "user.max_inotify_watches"),
          "instances": ("fs.inotify.max_user_instances", "user.max_inotify_instances")}


def sysctl_path(sysctl: str, proc: str = "/proc") -> str:
    """The /proc/sys file of a sysctl: `user.max_inotify_watches` ->
    `/proc/sys/user/max_inotify_watches`."""
    return f"{proc}/sys/{sysctl.replace('.', '/')}"


def limit_names(watches: Limit | None, instances: Limit | None) -> dict[str, str]:
    """{"watches": sysctl, "instances": sysctl} of the binding limits found."""
    return {kind: limit.sysctl for kind, limit in (("watches", watches),
                                                   ("instances", instances)) if limit}


def binding_limits(proc: str = "/proc") -> tuple[Limit | None, Limit | None]:
    """The binding (watches, instances) limits here. Outside a child user namespace the
    user.* files are the global ones under another name: the global is named then."""
    child = in_child_userns(proc)
    return _binding(proc, *LIMITS["watches"], child), _binding(proc, *LIMITS["instances"], child)


def _binding(proc: str, machine: str, own: str, child: bool) -> Limit | None:
    names = (machine, own) if child else (machine,)
    found = [Limit(name, value) for name in names
             if (value := _read_int(sysctl_path(name, proc))) is not None]
    # The lowest binds; on a tie the namespace's (raising the machine's would not help).
    return min(found, key=lambda limit: (limit.value, not limit.namespace), default=None)


def in_child_userns(proc: str = "/proc") -> bool:
    """Inside a user namespace other than the machine's (a container, `unshare -U`)? The
    initial namespace maps every uid to itself: `0 0 4294967295`."""
    try:
        return read_bytes(f"{proc}/self/uid_map").split() != [b"0", b"0", b"4294967295"]
    except OSError:
        return False


def _read_int(path: str) -> int | None:
    try:
        return int(read_bytes(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Inotify:
    """A real inotify instance through libc (for the kernel probe, tests and benchmarks)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def add_watch(self, path: str, mask: int = 0x00000FFF) -> int:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_add_watch {path}: {os.strerror(errno)}")
        return wd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def probe_watch_lines(proc: str = "/proc") -> bool | None:
    """Does this kernel print `inotify wd:` lines? One watch of our own tells; None if the
    probe itself cannot run (e.g. the instance budget is spent: try again later)."""
    try:
        probe = Inotify()
    except OSError:
        return None
    try:
        probe.add_watch(proc, 0x00000004)  # IN_ATTRIB on /proc: never fires, costs one watch
        return WD in read_bytes(f"{proc}/self/fdinfo/{probe.fd}")
    except OSError:
        return None
    finally:
        probe.close()
