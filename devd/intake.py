"""Connections that have not sent their request line yet, read by the serve loop itself.

A waiting client costs one fd and no thread, and gets one deadline for its whole line (not
one per recv: a client sending a byte a second is cut off all the same). When fds or slots
run out, the oldest waiting connection is dropped: a flood of idle sockets cycles through
while a real client, which sends its line at once, gets in.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import selectors
import socket
import time
from collections import OrderedDict

from devd import protocol
from devd.errors import DevdError, ProtocolError

log = logging.getLogger("devd")


def pending_limit() -> int:
    """Half the fd limit for waiting clients: the rest is for work (registry, git, pipes)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, min(512, (soft if soft > 0 else 1024) // 2))


class Waiting:
    """One accepted connection, its partial request line, and its deadline."""

    def __init__(self, sock: socket.socket, pid: int | None, deadline: float) -> None:
        self.sock = sock
        self.pid = pid
        self.deadline = deadline
        self.line = b""
        self._buffer = bytearray()

    def feed(self) -> bytes | None:
        """Read what is there; the line once complete, else None."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed before sending a request")
        self._buffer += chunk
        end = self._buffer.find(b"\n")
        if end >= 0:
            self.line = bytes(self._buffer[:end])
            return self.line
        if len(self._buffer) > protocol.MAX_REQUEST_BYTES:
            raise ProtocolError(f"message longer than {protocol.MAX_REQUEST_BYTES} bytes",
                                "requests must be one short line")
        return None


class Intake:
    """The waiting connections, oldest first, keyed by their socket's fd."""

    def __init__(self, selector: selectors.BaseSelector, timeout: float, limit: int) -> None:
        self._selector = selector
        self.timeout = timeout
        self.limit = limit
        self._waiting: OrderedDict[int, Waiting] = OrderedDict()
        self.dropped = 0

    def add(self, sock: socket.socket, pid: int | None) -> None:
        """Start waiting for this connection's line; beyond the limit the oldest goes."""
        while len(self._waiting) >= self.limit and self.drop_oldest():
            pass
        sock.setblocking(False)
        self._waiting[sock.fileno()] = Waiting(sock, pid, time.monotonic() + self.timeout)
        self._selector.register(sock, selectors.EVENT_READ)

    def ready(self, fd: int) -> Waiting | None:
        """Feed the connection on `fd`; return it (out of the intake) once its line is in."""
        waiting = self._waiting.get(fd)
        if waiting is None:
            return None
        try:
            line = waiting.feed()
        except BlockingIOError:
            return None
        except OSError:
            self._close(fd)
            return None
        except DevdError as exc:
            self._refuse(fd, exc)
            return None
        if line is None:
            return None
        del self._waiting[fd]
        self._selector.unregister(waiting.sock)
        waiting.sock.setblocking(True)
        return waiting

    def expire(self) -> None:
        """Cut off every connection whose deadline passed, with an error saying why."""
        now = time.monotonic()
        late = []
        for fd, waiting in self._waiting.items():  # oldest first: stop at the first in time
            if waiting.deadline > now:
                break
            late.append(fd)
        for fd in late:
            self._refuse(fd, ProtocolError(
                f"no complete request line within {self.timeout:g} s",
                "send the whole request line at once"))

    def next_deadline(self) -> float | None:
        """When the oldest waiting connection times out (insertion order is deadline order)."""
        return next((w.deadline for w in self._waiting.values()), None)

    def __contains__(self, fd: int) -> bool:
        return fd in self._waiting

    def drop_oldest(self) -> bool:
        """Close the longest-waiting connection to free its fd; False if none waits."""
        if not self._waiting:
            return False
        self._refuse(next(iter(self._waiting)), DevdError(
            "the daemon is flooded with idle connections; dropped the oldest",
            "retry; find what opens connections to devd's socket", code="busy"))
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
            log.warning("dropped %d idle connection(s) that sent no request: someone floods "
                        "the socket", self.dropped)
        return True

    def close_all(self) -> None:
        for fd in list(self._waiting):
            self._close(fd)

    def _refuse(self, fd: int, exc: DevdError) -> None:
        """Best effort: a short reply fits an empty socket buffer, so it never blocks."""
        with contextlib.suppress(OSError):
            self._waiting[fd].sock.send(protocol.encode({"ok": False, "error": exc.to_dict()}))
        self._close(fd)

    def _close(self, fd: int) -> None:
        waiting = self._waiting.pop(fd, None)
        if waiting is not None:
            self._selector.unregister(waiting.sock)
            waiting.sock.close()
