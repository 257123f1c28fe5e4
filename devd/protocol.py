"""The wire protocol: newline-delimited JSON over a Unix socket, one request per connection.

Client → daemon:  {"v": 1, "method": "status", "params": {...}}
Daemon → client:  zero or more {"event": "progress" | "heartbeat", ...} lines, then exactly one
                  {"ok": true, "result": ...} or
                  {"ok": false, "error": {"code", "message", "hint"}}.
See docs/protocol.md.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from devd.errors import ProtocolError

VERSION = 1
# A request is a method name and a few paths; a reply is at most the whole status.
MAX_REQUEST_BYTES = 1 << 20
MAX_REPLY_BYTES = 64 << 20
# While a request runs, the daemon sends {"event": "heartbeat"} this often (if asked to), so
# a client can give up on a silent daemon without cutting off minutes-long work.
HEARTBEAT_SECONDS = 0.5


def encode(message: dict[str, Any]) -> bytes:
    """One strict JSON line: NaN and Infinity, which other parsers refuse, become null."""
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(finite(message), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    return text.encode() + b"\n"


class Encoded:
    """A result encoded once and sent as it is (a cached status answer, asked for often):
    `encode` would spend more time on 100 worktrees than the rest of the request."""

    __slots__ = ("data",)

    def __init__(self, result: Any) -> None:
        self.data = encode(result)[:-1]

    def reply(self) -> bytes:
        """The success line `encode({"ok": True, "result": result})` would write."""
        return b'{"ok":true,"result":' + self.data + b"}\n"


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def decode(line: bytes) -> dict[str, Any]:
    """Parse one strict JSON object: NaN, Infinity and 1e999 are refused."""
    try:
        message = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed JSON line: {exc}", "send one JSON object per line") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object", "send one JSON object per line")
    return message


def request(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "method": method, "params": params or {}}


def parse_request(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a request's shape and return (method, params)."""
    if message.get("v") != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {message.get('v')!r} (this daemon speaks {VERSION})",
            "upgrade the client or restart the daemon with the same devd version",
        )
    method, params = message.get("method"), message.get("params", {})
    if not isinstance(method, str) or not isinstance(params, dict):
        raise ProtocolError("a request needs a string 'method' and an object 'params'")
    return method, params


class LineReader:
    """Reads newline-terminated lines from a socket, refusing any longer than a cap."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._buffer = bytearray()

    def readline(self, deadline: float | None = None) -> bytes:
        """The next line; with `deadline` (time.monotonic()), TimeoutError once it passes,
        however slowly the bytes trickle in."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._limit:
                raise ProtocolError(
                    f"message longer than {self._limit} bytes", "requests must be one short line"
                )
            self._sock.settimeout(None if deadline is None
                                  else max(deadline - time.monotonic(), 0.001))
            chunk = self._sock.recv(65536)
            if not chunk:
                where = "in the middle of a message" if self._buffer else "before a message"
                raise ConnectionResetError(f"the connection closed {where}")
            self._buffer += chunk


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end: SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS."""
    if hasattr(socket, "SO_PEERCRED"):
        return peer_creds(sock)[1]
    if sys.platform == "darwin":
        sol_local, local_peercred = 0, 1  # <sys/un.h>; struct xucred starts (version, uid)
        creds = sock.getsockopt(sol_local, local_peercred, struct.calcsize("IIh16I"))
        return int(struct.unpack_from("II", creds)[1])
    return None


def peer_creds(sock: socket.socket) -> tuple[int | None, int | None]:
    """(pid, uid) of the process at the other end, as the kernel says (Linux; else Nones).
    The pid is the connecting process itself: a client's word about pids is never needed."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None, peer_uid(sock)
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


# SO_PEERPIDFD (Linux 6.5): a pidfd of the process that connected, which a reused pid never
# names. Python 3.11 lacks the constant.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77) if sys.platform.startswith("linux") else None


def peer_holds(sock: socket.socket, pid: int) -> bool:
    """Does the process that connected still hold `pid`? Asked after reading what `pid`
    names (its start time, its parents): True means that read was of the connecting process,
    not of one that got its pid after it exited. Where the kernel cannot tell (Linux < 6.5,
    macOS), True: the pid is then the kernel's word at connect time, as before."""
    if SO_PEERPIDFD is None:
        return True
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        return exc.errno == errno.ENOPROTOOPT  # else it exited (ESRCH, EINVAL): not it
    try:
        signal.pidfd_send_signal(fd, 0)  # alive, so it still holds its pid: the peer pid
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
