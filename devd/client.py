"""Talk to the daemon: connect, send one request, pass progress events on, return the result.

Starts a daemon in the background when none answers, unless DEVD_NO_AUTOSTART=1.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from devd import protocol
from devd.errors import DaemonUnreachable, DevdError, ProtocolError, UsageError
from devd.paths import Paths, ensure_private_dir, flock_held

ProgressHandler = Callable[[dict[str, Any]], None]
AUTOSTART_TIMEOUT = 15.0
# Seconds to wait for the daemon's next message (DEVD_TIMEOUT); it sends a heartbeat every
# half second while a request runs, so this bounds a stopped daemon, never a slow request.
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 86400.0  # a day; far more overflows a socket timeout (OverflowError)
_UNREACHABLE = (FileNotFoundError, ConnectionRefusedError, NotADirectoryError)


class Client:
    def __init__(self, paths: Paths, autostart: bool = True,
                 on_autostart: Callable[[Paths], None] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.paths = paths
        self.autostart = autostart
        self.on_autostart = on_autostart  # starting takes a second: say so
        self.timeout = timeout
        self._sent: socket.socket | None = None

    def adopt(self, fd: int) -> None:
        """The next call's request was already sent on this connection (devd/quick.py sends
        `up` before the CLI's imports, so they overlap the daemon's work): read its reply."""
        self._sent = socket.socket(fileno=fd)

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_progress: ProgressHandler | None = None, deadline: float | None = None) -> Any:
        """Send one request; raise the daemon's error as the matching DevdError. The daemon
        must say something (progress or a heartbeat) every `timeout` seconds; with
        `deadline` (time.monotonic()), the whole call ends by then, whatever it says.

        A `busy` answer means the daemon ran nothing (every handler slot was taken, or the
        socket was flooded): the request is sent again, with a growing jittered pause, for
        up to `timeout` seconds, so a burst of hooks from twenty agents is served, not refused."""
        give_up = time.monotonic() + self.timeout
        pause = 0.02
        while True:
            try:
                return self._call_once(method, params, on_progress, deadline)
            except DevdError as exc:
                now = time.monotonic()
                if exc.code != "busy" or now + pause > min(give_up, deadline or give_up):
                    raise
            time.sleep(pause * _jitter())
            pause = min(pause * 2, 0.5)

    def _call_once(self, method: str, params: dict[str, Any] | None,
                   on_progress: ProgressHandler | None, deadline: float | None) -> Any:
        sent, self._sent = self._sent, None
        sock = sent or self._connect()
        with sock:
            if sent is None:
                _send(sock, protocol.request(method, params) | {"heartbeat": True})
            reader = protocol.LineReader(sock, protocol.MAX_REPLY_BYTES)
            # This daemon says "heartbeat" at once; an older one never does, and after its
            # first word is given all the time its work takes, as before.
            first, beating = True, False
            while True:
                message = self._next(reader, deadline, first or beating)
                first, beating = False, beating or message.get("event") == "heartbeat"
                event = message.get("event")
                if event == "progress" and on_progress:
                    on_progress(message)
                if event is not None:  # progress, heartbeat, and kinds added later
                    continue
                if message.get("ok") is True:
                    return message.get("result")
                if message.get("ok") is False and isinstance(message.get("error"), dict):
                    raise DevdError.from_dict(message["error"])
                raise ProtocolError(f"unexpected reply from the daemon: {message!r:.200}")

    def _next(self, reader: protocol.LineReader, deadline: float | None,
              idle_timeout: bool) -> dict[str, Any]:
        """The daemon's next message, within the idle timeout and the call's deadline."""
        idle = time.monotonic() + self.timeout if idle_timeout else math.inf
        until = min(idle, deadline or idle)
        try:
            return protocol.decode(reader.readline(None if until == math.inf else until))
        except TimeoutError:
            if deadline is not None and deadline < idle:
                raise DevdError("the devd daemon did not finish in time", "see `devd status`",
                                code="timeout") from None
            raise self.silent() from None
        except OSError as exc:  # reset, closed mid-line, or any other way the socket fails
            raise self.dropped(exc) from None

    def dropped(self, exc: OSError) -> DaemonUnreachable:
        """What to say of a daemon that closed the connection before it answered."""
        return DaemonUnreachable(f"the devd daemon dropped the connection ({exc})",
                                 f"it may have crashed or restarted; see {self.paths.daemon_log}")

    def silent(self) -> DaemonUnreachable:
        """What to say of a daemon that sent nothing for the whole timeout."""
        pid = daemon_pid(self.paths)
        return DaemonUnreachable(
            f"the devd daemon{f' (pid {pid})' if pid else ''} on {self.paths.socket} sent "
            f"nothing for {self.timeout:g} s: it is stopped, stuck or overloaded",
            f"check it (`ps -o stat= -p {pid or 'PID'}`; `kill -CONT` a stopped one, or restart "
            f"it); see {self.paths.daemon_log}; DEVD_TIMEOUT sets how long to wait")

    def _connect(self) -> socket.socket:
        try:
            return connect(self.paths, self.timeout)
        except TimeoutError:  # the backlog is full: a daemon holds the socket but accepts none
            raise self.silent() from None
        except _UNREACHABLE as exc:
            if not self.autostart:
                raise self._unreachable(exc) from exc
        except OSError as exc:  # e.g. reset while connecting: never a traceback in a hook
            raise self._unreachable(exc) from None
        if self.on_autostart:
            self.on_autostart(self.paths)
        start_daemon(self.paths)
        try:
            return connect(self.paths, self.timeout)
        except OSError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: OSError) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"no devd daemon answers on {self.paths.socket} ({exc.strerror or exc})",
            "start one with `devd daemon` (or `devd service install`), "
            "or unset DEVD_NO_AUTOSTART to let the CLI start it",
        )


def _jitter() -> float:
    """A factor in [0.5, 1.5) that differs between clients retrying at once (not `random`:
    importing it costs the fast status path 2 ms)."""
    return 0.5 + (time.monotonic_ns() ^ os.getpid() * 2654435761) % 1000 / 1000


def caller_overrides() -> dict[str, str]:
    """Settings a user sets in the shell that calls devd, which must win over whatever the
    daemon was started with (by a hook, an older shell, or the user service)."""
    url = os.environ.get("DEVD_POSTGRES_URL")
    return {"postgres_url": url} if url else {}


def timeout_from(environ: dict[str, str] | os._Environ[str]) -> float:
    """DEVD_TIMEOUT: how many seconds the CLI waits for the daemon's next word."""
    raw = environ.get("DEVD_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise UsageError(f"DEVD_TIMEOUT={raw!r} is not a number of seconds between 0 and "
                         f"{MAX_TIMEOUT:g}", f"unset it for the default ({DEFAULT_TIMEOUT:g} s)")
    return value


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    """A daemon that refuses a request early (say, one too long) closes before reading it
    all: its error reply is already in our buffer, so read on instead of failing here."""
    try:
        sock.sendall(protocol.encode(message))
    except (BrokenPipeError, ConnectionResetError):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def daemon_pid(paths: Paths) -> int | None:
    """The pid the running daemon wrote into its lock file, if any."""
    try:
        return int(paths.lock_file.read_text().strip())
    except (OSError, ValueError):
        return None


def connect(paths: Paths, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """Connect, and make sure the daemon answering is ours: in a shared /tmp anyone could
    have made the directory and put a socket of their own there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect_within(sock, str(paths.socket), time.monotonic() + timeout)
        server = protocol.peer_uid(sock)
    except OSError:
        sock.close()
        raise
    if server is not None and server != os.getuid():
        sock.close()
        raise DaemonUnreachable(
            f"{paths.socket} is served by uid {server}, not by you (uid {os.getuid()})",
            f"remove {paths.runtime_dir} if you trust nothing in it, or set XDG_RUNTIME_DIR",
        )
    return sock


def _connect_within(sock: socket.socket, path: str, deadline: float) -> None:
    """A full backlog answers a Unix connect with EAGAIN at once (a socket with a timeout
    is non-blocking inside): try again until the deadline."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: the daemon accepts no connections") from None
            time.sleep(0.05)


def start_daemon(paths: Paths) -> None:
    """Start `devd daemon` detached (own session, log in the state dir); wait until it answers."""
    import subprocess  # only needed here; keeps every other CLI call lighter

    ensure_private_dir(paths.state_dir)
    with open(paths.daemon_log, "ab") as log:
        # GIT_* from a hook's environment must not follow the daemon into every repo it serves.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        # -P and cwd="/": `-m` would otherwise put the caller's directory (say, a worktree
        # holding a file named sqlite3.py) first on the daemon's import path, for life.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "devd", "daemon"], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, close_fds=True, env=env, cwd="/",
        )
    deadline = time.monotonic() + AUTOSTART_TIMEOUT
    while time.monotonic() < deadline:
        try:
            connect(paths).close()
            return
        except (TimeoutError, *_UNREACHABLE):
            pass
        if proc.poll() is not None and not _lock_held_by_other(paths):
            raise DaemonUnreachable(
                f"the devd daemon exited at start (code {proc.returncode}): {_tail(paths)}",
                f"see {paths.daemon_log}",
            )
        time.sleep(0.02)
    raise DaemonUnreachable(f"the devd daemon did not answer within {AUTOSTART_TIMEOUT:.0f} s",
                            f"see {paths.daemon_log}")


def _lock_held_by_other(paths: Paths) -> bool:
    """Our daemon may have lost a start race to another one that is still binding."""
    return flock_held(paths.lock_file)


def _tail(paths: Paths, lines: int = 5) -> str:
    try:
        with open(paths.daemon_log, "rb") as log:  # only its end: the log grows for life
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            text = log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
